"""Read a PyTorch state dict (``torch.save``) into numpy arrays, without torch.

Both on-disk layouts are handled: the zip format (torch >= 1.6: ``*/data.pkl``
plus raw storages ``*/data/<key>``) and the older "legacy" format (a run of
pickles followed by the raw storages). Unpickling goes through an allow-list,
so a file that names any other global is refused instead of run.
"""

import collections
import pickle
import struct
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> numpy dtype (torch always writes little-endian here).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class _Storage:
    """A storage named in the pickle; its bytes are filled in after unpickling."""

    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
        self.base, self.offset = None, 0  # set for legacy "views" of a storage


class _Tensor:
    """What ``_rebuild_tensor_v2`` returns; turned into an ndarray at the end."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def to_numpy(self, blobs):
        st = self.storage
        flat = np.frombuffer(blobs[(st.base or st).key], dtype=st.dtype)
        flat = flat[st.offset:st.offset + st.numel]
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, st.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
            raise ValueError("tensor view lies outside its storage")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.size, [s * st.dtype.itemsize for s in self.stride],
            writeable=False)
        return np.array(view, order="C")  # C-contiguous, writable copy


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): np.dtype(dt) for name, dt in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not part of a plain "
                "tensor state dict") from None

    def persistent_load(self, pid):
        # zip:    ('storage', dtype, key, location, numel)
        # legacy: ('storage', dtype, root_key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                and isinstance(pid[1], np.dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(dtype, key, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy view: (view_key, offset, view_numel)
            v = _Storage(dtype, str(view[0]), int(view[2]))
            v.base, v.offset = st, int(view[1])
            return v
        return st


class _SafeHeader(pickle.Unpickler):
    """For the legacy header pickles: plain data only, no globals at all."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_zip(path):
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one data.pkl, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        with zf.open(pkl[0]) as f:
            up = _Unpickler(f)
            obj = up.load()
        blobs = {k: zf.read(f"{prefix}data/{k}") for k in up.storages}
    return obj, blobs


def _load_legacy(path):
    with open(path, "rb") as f:
        if _SafeHeader(f).load() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch.save file")
        _SafeHeader(f).load()  # protocol version
        sys_info = _SafeHeader(f).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian files are not supported")
        up = _Unpickler(f)
        obj = up.load()
        keys = _SafeHeader(f).load()  # storage keys, in the order written below
        blobs = {}
        for key in keys:  # each: int64 element count, then the raw bytes
            st = up.storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            blobs[st.key] = f.read(numel * st.dtype.itemsize)
    return obj, blobs


def load_state_dict(path):
    """Return ``{name: ndarray}`` for the tensors in a ``torch.save``'d state dict."""
    obj, blobs = (_load_zip if zipfile.is_zipfile(path) else _load_legacy)(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top-level object is {type(obj).__name__}, not a dict")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, _Tensor):
            raise ValueError(f"{path}: entry {name!r} is not a tensor")
        out[str(name)] = value.to_numpy(blobs)
    return out

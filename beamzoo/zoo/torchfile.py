"""Read a PyTorch state dict (``torch.save``) into numpy arrays, without torch.

Both on-disk layouts are handled: the zip format (torch >= 1.6: ``*/data.pkl``
plus raw storages ``*/data/<key>``) and the older "legacy" format (a run of
pickles followed by the raw storages). Unpickling goes through an allow-list,
so a file that names any other global is refused instead of run.

The file is untrusted, so no size it declares is believed before it is checked
against what the file really holds: every pickle's opcodes are walked first
(lengths, memo indices, opcode count, and how much its memo references expand
to), storages must fit in the bytes that back them, tensor views must stay
inside their storage, and the arrays returned may not add up to more than a few
times the file's size. Every refusal raises :class:`UnsafeTorchFile`, with the
path and what was wrong, before any large allocation.
"""

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import sys
import zipfile
import zlib

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_PICKLE_OPS = 2_000_000  # opcodes in one pickle; each builds at most one object
_MAX_PICKLE_WORK = 16 * _MAX_PICKLE_OPS  # items in all it builds, shared ones in full
_MAX_NDIM = 64  # numpy's limit

# torch storage class name -> numpy dtype (torch always writes little-endian here).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class UnsafeTorchFile(pickle.UnpicklingError, ValueError):
    """A file refused as hostile or malformed: code, or sizes it cannot back."""


def _budget(file_size):
    """The most bytes a file may unpack to (its pickle; its storages; its tensors)."""
    return 4 * file_size + (1 << 20)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60


def _describe(obj):
    """A bounded repr for error messages (a plain one can be exponential in the
    pickle's size: memo references let a few bytes nest one list in itself 2**30 times)."""
    try:
        return _REPR.repr(obj)
    except Exception:  # e.g. an int with too many digits to print
        return f"<{type(obj).__name__}>"


def _is_int(v):
    return type(v) is int  # not bool, not an int subclass


# ------------------------------------------------------------ pickle walking --

class _PickleModel:
    """The unpickler's stack and memo with every value replaced by its size: the
    items a full traversal of it visits, each memo reference counted in full
    (so a few bytes that nest a tuple in itself 2**30 times show as 2**30).
    ``work`` adds up the sizes of all that gets built."""

    _PUTS = ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
    _GETS = ("GET", "BINGET", "LONG_BINGET")
    _IN_PLACE = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")

    def __init__(self):
        self.stack, self.marks, self.memo, self.work = [], [], {}, 0

    def step(self, op, arg):
        if op.name == "MARK":
            self.marks.append(len(self.stack))
        elif op.name in self._PUTS:
            self.put(len(self.memo) if op.name == "MEMOIZE" else arg)
        elif op.name in self._GETS:
            self.get(arg)
        else:
            self.build(op)

    def put(self, idx):
        # The C unpickler grows its memo array to the index: no skipping ahead.
        if not 0 <= idx <= len(self.memo):
            raise UnsafeTorchFile(
                f"memo put at index {idx} skips ahead of the {len(self.memo)} entries so far")
        if not self.stack or self.marks[-1:] == [len(self.stack)]:
            raise UnsafeTorchFile("nothing to put in the memo")
        self.memo[idx] = self.stack[-1]

    def get(self, idx):
        if idx not in self.memo:
            raise UnsafeTorchFile(f"memo get of index {idx}, which was never put")
        self.stack.append(self.memo[idx])  # a reference: no work yet

    def take(self, op):
        """Pop the operands of ``op``: all above the last MARK, and/or a fixed count."""
        taken, below = [], len(op.stack_before)
        if pickletools.markobject in op.stack_before:
            if not self.marks:
                raise UnsafeTorchFile("no MARK to pop to")
            height = self.marks.pop()
            taken, self.stack[height:] = self.stack[height:], []
            below = op.stack_before.index(pickletools.markobject)
        if len(self.stack) - (self.marks[-1] if self.marks else 0) < below:
            raise UnsafeTorchFile("pops more than the stack holds")
        if below:
            taken, self.stack[-below:] = self.stack[-below:] + taken, []
        return taken

    def build(self, op):
        taken = self.take(op)
        if op.name == "DUP":
            self.stack += taken * 2
        elif op.name in self._IN_PLACE:  # the container grows by the items added
            self.work += sum(taken[1:])
            self.stack.append(taken[0] + sum(taken[1:]))
        elif op.stack_after:  # a new value, as big as all it is made of
            self.stack.append(1 + sum(taken))
            self.work += self.stack[-1]


def _check_opcodes(data, start, where):
    """Walk the pickle at ``data[start:]`` without building anything; return
    where it ends. The C unpickler then trusts what was checked: counted
    lengths (it allocates them before reading), memo indices, the number of
    opcodes, and the total size of what gets built (see _PickleModel)."""
    f = io.BytesIO(data)
    f.seek(start)
    ops, model = pickletools.genops(f), _PickleModel()
    for _ in range(_MAX_PICKLE_OPS + 1):
        try:
            op, arg, pos = next(ops)
        except StopIteration:  # after STOP
            return f.tell()
        except ValueError as e:  # truncated argument, unknown opcode, no STOP
            raise UnsafeTorchFile(f"{where}: malformed pickle: {e}") from None
        try:
            model.step(op, arg)
            if model.work > _MAX_PICKLE_WORK:
                raise UnsafeTorchFile(f"its objects add up to more than {_MAX_PICKLE_WORK} "
                                      "items, counting each memo reference in full")
        except UnsafeTorchFile as e:
            raise UnsafeTorchFile(f"{where}: {op.name} at byte {pos - start}: {e}") from None
    raise UnsafeTorchFile(f"{where}: pickle has more than {_MAX_PICKLE_OPS} opcodes")


def _unpickle(up, where):
    """``up.load()``, with any error the pickle provokes turned into UnsafeTorchFile."""
    try:
        return up.load()
    except UnsafeTorchFile:
        raise
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            EOFError, IndexError, KeyError) as e:
        raise UnsafeTorchFile(f"{where}: bad pickle: {type(e).__name__}: {str(e)[:200]}") from e


# ------------------------------------------------ what the pickle may build --

class _Sealed:
    """Objects handed to the unpickler: a pickle's BUILD may not change them
    after their checks."""

    def __setstate__(self, state):
        raise UnsafeTorchFile(f"refusing pickled state for a {type(self).__name__.strip('_')}")


class _StorageType(_Sealed):
    """What ``torch.FloatStorage`` etc. unpickle to."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage(_Sealed):
    """A storage named in the pickle; its bytes are filled in after unpickling."""

    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
        self.base, self.offset = None, 0  # set for legacy "views" of a storage


class _Tensor(_Sealed):
    """What ``_rebuild_tensor_v2`` returns; turned into an ndarray at the end."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = size, stride

    @property
    def nbytes(self):
        return math.prod(self.size) * self.storage.dtype.itemsize

    def to_numpy(self, blobs):
        st = self.storage
        flat = np.frombuffer(blobs[(st.base or st).key], dtype=st.dtype)
        flat = flat[st.offset:st.offset + st.numel]
        if flat.size != st.numel:  # the loaders guarantee this; kept as a last guard
            raise UnsafeTorchFile(f"storage {_describe(st.key)} is short of data")
        if math.prod(self.size) == 0:
            return np.zeros(self.size, st.dtype)
        strides = [s * st.dtype.itemsize if n > 1 else 0  # size-1 strides are moot
                   for n, s in zip(self.size, self.stride)]
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.size, strides, writeable=False)
        return np.array(view, order="C")  # C-contiguous, writable copy


def _int_tuple(v, what):
    if not (isinstance(v, (tuple, list)) and len(v) <= _MAX_NDIM and all(map(_is_int, v))):
        raise UnsafeTorchFile(f"tensor {what} {_describe(v)} is not a tuple of at most "
                              f"{_MAX_NDIM} ints")
    return tuple(v)


def _check_view(storage, offset, size, stride):
    """Refuse a tensor that reads outside its storage or has more elements than it."""
    def refuse(why):
        raise UnsafeTorchFile(f"tensor of shape {_describe(size)} stride {_describe(stride)} "
                              f"offset {_describe(offset)} {why}")

    if len(size) != len(stride) or not _is_int(offset) or offset < 0 or min(size, default=0) < 0:
        refuse("is malformed")
    numel = math.prod(size)
    if numel == 0:  # reads nothing; numpy must still accept the shape
        if math.prod(n for n in size if n) > sys.maxsize // 16:
            refuse("has too large a shape")
        return
    for n, s in zip(size, stride):
        # A stride <= 0 lets a tiny storage stand for a huge tensor (or reads before it).
        if n > 1 and s <= 0:
            refuse(f"has stride {_describe(s)} on a dimension of size {n}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
        refuse(f"reads element {_describe(last)} of a {storage.numel}-element storage")
    # Overlapping strides (all 1, say) stay inside but repeat elements: bound the count.
    if numel > storage.numel - offset:
        refuse(f"has {numel} elements, more than its {storage.numel}-element storage "
               "holds past the offset")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafeTorchFile(f"tensor storage is {_describe(storage)}, not a storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    _check_view(storage, offset, size, stride)
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _Function(_Sealed):
    """An allowed function, sealed so that a pickle cannot set its attributes."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    **{("torch", name): _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()},
}


def _storage_pid(pid):
    """(dtype, key, numel, view) from a storage persistent id, or refuse it.
    zip:    ('storage', type, key, location, numel)
    legacy: ('storage', type, root_key, location, numel, view_metadata)"""
    ok = (type(pid) is tuple and len(pid) in (5, 6) and type(pid[0]) is str
          and pid[0] == "storage" and isinstance(pid[1], _StorageType)
          and type(pid[2]) is str and _is_int(pid[4]) and pid[4] >= 0)
    view = pid[5] if ok and len(pid) == 6 else None
    if view is not None:  # legacy view: (view_key, offset, view_numel)
        ok = (type(view) is tuple and len(view) == 3 and type(view[0]) is str
              and _is_int(view[1]) and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0)
    if not ok:
        raise UnsafeTorchFile(f"unsupported persistent id {_describe(pid)}")
    return pid[1].dtype, pid[2], pid[4], view


class _Unpickler(pickle.Unpickler):
    """Tensor state dict unpickler. ``capacity(key)`` -> (name, bytes the file
    can give that storage), to refuse a storage before anything is read for it."""

    def __init__(self, file, capacity):
        super().__init__(file)
        self.storages, self.capacity = {}, capacity

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeTorchFile(f"refusing to load global {module[:80]}.{name[:80]}: not "
                                  "part of a plain tensor state dict") from None

    def persistent_load(self, pid):
        dtype, key, numel, view = _storage_pid(pid)
        st = self.storages.get(key)
        if st is None:
            name, available = self.capacity(key)
            nbytes = numel * dtype.itemsize
            if nbytes > available:
                raise UnsafeTorchFile(f"storage {_describe(name)} declares {nbytes} bytes "
                                      f"but the file holds {available}")
            st = self.storages[key] = _Storage(dtype, key, numel)
        elif (st.dtype, st.numel) != (dtype, numel):
            raise UnsafeTorchFile(f"storage {_describe(key)} is declared twice, differently")
        if view is None:
            return st
        if view[1] + view[2] > st.numel:
            raise UnsafeTorchFile(f"view {_describe(view)} lies outside its "
                                  f"{st.numel}-element storage {_describe(key)}")
        v = _Storage(dtype, view[0], view[2])
        v.base, v.offset = st, view[1]
        return v


class _SafeHeader(pickle.Unpickler):
    """For the legacy header pickles: plain data only, no globals at all."""

    def find_class(self, module, name):
        raise UnsafeTorchFile(f"refusing to load global {module[:80]}.{name[:80]}")


def _plain_pickle(data, start, where):
    """(obj, end) for a legacy header pickle at ``data[start:]``: plain data only."""
    end = _check_opcodes(data, start, where)
    return _unpickle(_SafeHeader(io.BytesIO(data[start:end])), where), end


# ----------------------------------------------------------------- formats --

def _read_zip_member(zf, info, nbytes, what):
    """Exactly ``nbytes`` from the start of a member (never more than that is allocated)."""
    with zf.open(info) as f:
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise UnsafeTorchFile(f"{what} {_describe(info.filename)} declares {nbytes} bytes "
                              f"but the file holds {len(data)}")
    return data


def _load_zip(path, budget):
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: i for i in zf.infolist()}
        pkl = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise UnsafeTorchFile(f"expected one data.pkl, found {_describe(pkl)}")
        info, prefix = members[pkl[0]], pkl[0][: -len("data.pkl")]
        if info.file_size > budget:  # a compressed member can unpack to anything
            raise UnsafeTorchFile(f"{_describe(info.filename)} unpacks to {info.file_size} "
                                  f"bytes, more than {budget} allowed")
        data = _read_zip_member(zf, info, info.file_size, "pickle")

        def capacity(key):
            name = f"{prefix}data/{key}"
            if name not in members:
                raise UnsafeTorchFile(f"storage {_describe(name)} is missing from the archive")
            return name, members[name].file_size

        end = _check_opcodes(data, 0, info.filename)
        up = _Unpickler(io.BytesIO(data[:end]), capacity)
        obj = _unpickle(up, info.filename)
        total = sum(st.numel * st.dtype.itemsize for st in up.storages.values())
        if total > budget:  # each fits its member, but members can be compressed
            raise UnsafeTorchFile(f"storages declare {total} bytes, more than "
                                  f"{budget} allowed for this file")
        blobs = {k: _read_zip_member(zf, members[f"{prefix}data/{k}"],
                                     st.numel * st.dtype.itemsize, "storage")
                 for k, st in up.storages.items()}
    return obj, blobs


def _legacy_storages(data, pos, keys, storages):
    """The storage blocks after the legacy pickles: int64 element count, raw bytes."""
    if not (isinstance(keys, list) and all(type(k) is str for k in keys)
            and sorted(keys) == sorted(storages)):
        raise UnsafeTorchFile(f"storage key list {_describe(keys)} does not match "
                              f"the {len(storages)} storages the pickle names")
    blobs, view = {}, memoryview(data)
    for key in keys:  # in the order written
        st = storages[key]
        if pos + 8 > len(data):
            raise UnsafeTorchFile(f"storage {_describe(key)} has no data block")
        (numel,) = struct.unpack_from("<q", data, pos)
        nbytes, pos = st.numel * st.dtype.itemsize, pos + 8
        if numel != st.numel:
            raise UnsafeTorchFile(f"storage {_describe(key)} declares {st.numel} elements "
                                  f"but its data block says {numel}")
        if nbytes > len(data) - pos:
            raise UnsafeTorchFile(f"storage {_describe(key)} declares {nbytes} bytes "
                                  f"but the file holds {len(data) - pos}")
        blobs[key], pos = view[pos:pos + nbytes], pos + nbytes
    return blobs


def _load_legacy(path):
    with open(path, "rb") as f:
        data = f.read()
    magic, pos = _plain_pickle(data, 0, "magic number pickle")
    if not (_is_int(magic) and magic == _LEGACY_MAGIC):
        raise UnsafeTorchFile("not a torch.save file")
    _, pos = _plain_pickle(data, pos, "protocol version pickle")
    sys_info, pos = _plain_pickle(data, pos, "sys_info pickle")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise UnsafeTorchFile("big-endian files are not supported")
    end = _check_opcodes(data, pos, "state dict pickle")
    # Storage data can only lie after this pickle: that bounds every storage.
    up = _Unpickler(io.BytesIO(data[pos:end]), lambda key: (key, len(data) - end))
    obj = _unpickle(up, "state dict pickle")
    keys, pos = _plain_pickle(data, end, "storage key list pickle")  # order of the blocks
    return obj, _legacy_storages(data, pos, keys, up.storages)


def _state_dict_tensors(obj, file_size):
    """[(name, _Tensor)] of the top-level dict, refused if they would unpack to
    more than the file's budget (one storage referenced many times, say)."""
    if not isinstance(obj, dict):
        raise UnsafeTorchFile(f"top-level object is {type(obj).__name__}, not a dict")
    items = list(obj.items())
    for name, value in items:
        if type(name) is not str:
            raise UnsafeTorchFile(f"entry key {_describe(name)} is not a string")
        if not isinstance(value, _Tensor):
            raise UnsafeTorchFile(f"entry {_describe(name)} is not a tensor")
    total = sum(t.nbytes for _, t in items)
    if total > _budget(file_size):
        raise UnsafeTorchFile(
            f"the tensors add up to {total} bytes, more than the {_budget(file_size)} allowed "
            f"(4 x the file's {file_size} bytes + 1 MiB); is one storage referenced many times?")
    return items


def _load(path):
    file_size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        try:
            obj, blobs = _load_zip(path, _budget(file_size))
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:
            raise UnsafeTorchFile(f"bad zip archive: {e}") from e  # OSError: a bad offset
    else:
        obj, blobs = _load_legacy(path)
    return {name: t.to_numpy(blobs) for name, t in _state_dict_tensors(obj, file_size)}


def load_state_dict(path):
    """Return ``{name: ndarray}`` for the tensors in a ``torch.save``'d state dict.

    Raises UnsafeTorchFile, before any large allocation, for a file that names
    code or whose sizes the file cannot back; its message starts with the path."""
    try:
        return _load(path)
    except UnsafeTorchFile as e:
        e.args = (f"{path}: {e}",)
        raise

"""Hostile torch.save files for beamzoo.zoo.torchfile.

Each file is a few hundred bytes to a few hundred KB, written by hand (pickle
opcodes, zip members), and would make a trusting loader allocate gigabytes.
Each is loaded in a child process with a 1 GiB address-space limit (so a
missing check fails as MemoryError instead of exhausting the machine) and must
be refused with UnsafeTorchFile, with a message naming the problem, while the
child's peak RSS stays small.
"""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from beamzoo.zoo import torchfile

GiB, MiB = 1 << 30, 1 << 20

# ------------------------------------------------- a protocol-2 assembler --
# Just enough opcodes to write what torch.save writes, and to misuse them.

PROTO, STOP, NONE, MARK = b"\x80\x02", b".", b"N", b"("


def s(text):  # BINUNICODE
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def i(n):  # BININT, or LONG1 past 32 bits
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def tup(*items):  # MARK ... TUPLE
    return MARK + b"".join(items) + b"t"


def glob(module, name):  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def put(n):  # LONG_BINPUT
    return b"r" + struct.pack("<I", n)


def get(n):  # LONG_BINGET
    return b"j" + struct.pack("<I", n)


def pid(key, numel, kind="FloatStorage", legacy=False, view=None):
    """A storage persistent id, then BINPERSID (legacy ids add view metadata)."""
    extra = []
    if legacy:
        extra = [NONE if view is None else tup(s(view[0]), i(view[1]), i(view[2]))]
    return tup(s("storage"), glob("torch", kind), s(key), s("cpu"), i(numel), *extra) + b"Q"


def tensor(storage, offset, size, stride):  # _rebuild_tensor_v2(...) via REDUCE
    return (glob("torch._utils", "_rebuild_tensor_v2")
            + tup(storage, i(offset), tup(*map(i, size)), tup(*map(i, stride)), b"\x89", NONE)
            + b"R")


def state_dict(entries):  # {name: value}: EMPTY_DICT MARK key value ... SETITEMS
    return PROTO + b"}" + MARK + b"".join(s(k) + v for k, v in entries) + b"u" + STOP


# --------------------------------------------------------------- writers --

def write_zip(path, pkl, storages=(), deflate=False):
    """torch >= 1.6 layout; storages: [(key, raw bytes)]."""
    kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl, compress_type=kind)
        for key, raw in storages:
            zf.writestr(f"archive/data/{key}", raw, compress_type=kind)
    return path


def write_legacy(path, pkl, storages=()):
    """Pre-1.6 layout; storages: [(key, element count written, raw bytes)]."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                                      "little_endian": True}):
            f.write(pickle.dumps(header, protocol=2))
        f.write(pkl)
        f.write(pickle.dumps([key for key, _, _ in storages], protocol=2))
        for _, count, raw in storages:
            f.write(struct.pack("<q", count) + raw)
    return path


def write(fmt, path, pkl_for, storages):
    """Write either format; pkl_for(legacy) builds the pickle, storages: [(key, dtype, raw)]."""
    if fmt == "zip":
        return write_zip(path, pkl_for(False), [(k, raw) for k, _, raw in storages])
    return write_legacy(path, pkl_for(True),
                        [(k, len(raw) // np.dtype(dt).itemsize, raw) for k, dt, raw in storages])


# ------------------------------------------------------------ the child --

_CHILD = r"""
import importlib.util, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
spec = importlib.util.spec_from_file_location("torchfile", sys.argv[1])
tf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tf)
try:
    tf.load_state_dict(sys.argv[2])
    outcome, msg = "loaded", ""
except tf.UnsafeTorchFile as e:
    outcome, msg = "refused", str(e)
except BaseException as e:
    outcome, msg = type(e).__name__, str(e)[:300]
# Linux carries ru_maxrss over exec from the forked copy of the (maybe big) parent;
# VmHWM is this process's own peak.
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
except (OSError, StopIteration):
    pass
print(json.dumps([outcome, msg, peak]))
"""


def assert_refused(path, pattern, attack_bytes=None):
    """Load `path` in a child: refused, "<path>: " then a message matching `pattern`,
    peak RSS < 300 MiB. Returns the message after the path."""
    assert attack_bytes is None or attack_bytes >= GiB  # what a trusting loader allocates
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _CHILD, torchfile.__file__, str(path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    outcome, msg, peak_kib = json.loads(run.stdout)
    assert outcome == "refused" and msg.startswith(f"{path}: "), (outcome, msg)
    msg = msg[len(f"{path}: "):]
    assert re.search(pattern, msg), msg
    assert peak_kib * 1024 < 300 * MiB, f"peak RSS {peak_kib} KiB"
    return msg


FLOATS4 = [("0", "<f4", np.arange(4, dtype="<f4").tobytes())]  # a 16-byte storage
fmts = pytest.mark.parametrize("fmt", ["zip", "legacy"])


# --------------------------------------------------------------- attacks --

def test_oversized_storage_zip(tmp_path):
    # Declares 10**9 floats; the member holds 16 bytes.
    pkl = state_dict([("w", tensor(pid("0", 10**9), 0, (4,), (1,)))])
    path = write_zip(tmp_path / "a.pth", pkl, [("0", FLOATS4[0][2])])
    assert os.path.getsize(path) < 1000
    assert_refused(path, r"^storage 'archive/data/0' declares 4000000000 bytes "
                         r"but the file holds 16$", 4 * 10**9)


@pytest.mark.parametrize("declared, on_disk, pattern", [
    (10**9, 10**9, r"^storage '0' declares 4000000000 bytes but the file holds \d+$"),
    (4, 10**9, r"^storage '0' declares 4 elements but its data block says 1000000000$"),
], ids=["pickle", "block"])
def test_oversized_storage_legacy(tmp_path, declared, on_disk, pattern):
    # The element count in the pickle, or the one before the raw bytes, is a lie.
    pkl = state_dict([("w", tensor(pid("0", declared, legacy=True), 0, (4,), (1,)))])
    path = write_legacy(tmp_path / "a.pth", pkl, [("0", on_disk, FLOATS4[0][2])])
    assert os.path.getsize(path) < 1000
    assert_refused(path, pattern, 4 * 10**9)


VIEW_ATTACKS = {  # name: (size, stride, offset, pattern)
    "zero_stride": ((65536, 65536), (0, 0), 0,
                    r"has stride 0 on a dimension of size 65536$"),
    "negative_stride": ((65536, 65536), (-1, 1), 3,
                        r"has stride -1 on a dimension of size 65536$"),
    "past_the_end": ((32768, 32768), (32768, 1), 0,
                     r"reads element 1073741823 of a 4-element storage$"),
}


@fmts
@pytest.mark.parametrize("attack", list(VIEW_ATTACKS))
def test_tensor_view_outside_storage(tmp_path, fmt, attack):
    # A 16-byte storage viewed as a 2**30..2**32-element tensor.
    size, stride, offset, pattern = VIEW_ATTACKS[attack]
    path = write(fmt, tmp_path / "a.pth", lambda legacy: state_dict(
        [("w", tensor(pid("0", 4, legacy=legacy), offset, size, stride))]), FLOATS4)
    assert os.path.getsize(path) < 1000
    msg = assert_refused(path, r"^tensor of shape \(\d+, \d+\) stride .* " + pattern,
                         4 * size[0] * size[1])
    assert f"offset {offset}" in msg


@fmts
def test_overlapping_strides(tmp_path, fmt):
    # Every stride 1: six 64-long dimensions fit in 379 bytes but make 64 GiB.
    size = (64,) * 6
    path = write(fmt, tmp_path / "a.pth", lambda legacy: state_dict(
        [("w", tensor(pid("0", 379, "ByteStorage", legacy), 0, size, (1,) * 6))]),
        [("0", "u1", bytes(379))])
    assert os.path.getsize(path) < 1500
    assert_refused(path, r"has 68719476736 elements, more than its 379-element storage",
                   64**6)


@fmts
def test_one_storage_referenced_10000_times(tmp_path, fmt):
    # One honest 256 KiB tensor, memoized, then the value of 10,000 entries.
    numel, refs = 65536, 10_000

    def pkl(legacy):
        first = tensor(pid("0", numel, legacy=legacy), 0, (numel,), (1,)) + put(0)
        return state_dict([("t0", first)] + [(f"t{n}", get(0)) for n in range(1, refs)])

    if fmt == "zip":  # deflated, the whole file is a few KB
        path = write_zip(tmp_path / "a.pth", pkl(False), [("0", bytes(4 * numel))], deflate=True)
    else:
        path = write_legacy(tmp_path / "a.pth", pkl(True), [("0", numel, bytes(4 * numel))])
    size = os.path.getsize(path)
    assert size < (40_000 if fmt == "zip" else 500_000)
    assert_refused(path, rf"^the tensors add up to {4 * numel * refs} bytes, more than the "
                         rf"{4 * size + MiB} allowed \(4 x the file's {size} bytes \+ 1 MiB\)",
                   4 * numel * refs)


@fmts
def test_memo_get_of_missing_index(tmp_path, fmt):
    path = write(fmt, tmp_path / "a.pth", lambda legacy: state_dict(
        [("w", tensor(pid("0", 4, legacy=legacy), 0, (4,), (1,)) + put(0)),
         ("v", get(7))]), FLOATS4)
    # Nothing to allocate here: a get the memo cannot answer is refused by name.
    msg = assert_refused(path, r": LONG_BINGET at byte \d+: memo get of index 7, which was "
                               r"never put$")
    assert msg.startswith("archive/data.pkl: " if fmt == "zip" else "state dict pickle: ")


@fmts
def test_memo_put_far_ahead(tmp_path, fmt):
    # The C unpickler grows its memo to the index: 2**31 slots = 16 GiB, in 5 bytes.
    path = write(fmt, tmp_path / "a.pth",
                 lambda legacy: PROTO + b"}" + put(2**31 - 1) + STOP, [])
    assert_refused(path, r"memo put at index 2147483647 skips ahead of the 0 entries so far$",
                   8 * 2**31)


def doubled(depth):
    """x0 = None, x[n+1] = (x[n], x[n]) via memo gets: 7 bytes a level, 2**depth leaves."""
    body = NONE + put(0) + b"0"  # POP
    for n in range(depth):
        body += get(n) + get(n) + b"\x86" + put(n + 1) + b"0"  # TUPLE2
    return body + get(depth)


def test_memo_doubled_key(tmp_path):
    # {x30: None}: a 230-byte pickle; hashing the key (or printing it) visits 2**30 leaves.
    path = write_zip(tmp_path / "a.pth", PROTO + b"}" + doubled(30) + NONE + b"s" + STOP)
    assert os.path.getsize(path) < 1000
    assert_refused(path, r"^archive/data.pkl: TUPLE2 at byte \d+: its objects add up to more "
                         r"than 32000000 items, counting each memo reference in full$",
                   6 * 2**30)


def test_unprintable_key_is_described_briefly(tmp_path):
    # {x12: None} passes the walk; the error must not print its 4096 leaves.
    path = write_zip(tmp_path / "a.pth", PROTO + b"}" + doubled(12) + NONE + b"s" + STOP)
    with pytest.raises(torchfile.UnsafeTorchFile,
                       match=r"entry key \(\(.*\) is not a string$") as e:
        torchfile.load_state_dict(path)
    assert len(str(e.value)) < len(str(path)) + 200


def test_huge_memo_container_in_zip(tmp_path):
    # [x, x, x, ...] with 2**27 memo gets: a 256 MiB data.pkl, 1 GiB of list,
    # deflated to about 250 KB.
    path = tmp_path / "a.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as f:
            f.write(PROTO + b"]" + put(0) + MARK)
            chunk = b"h\x00" * (1 << 20)  # BINGET 0
            for _ in range(128):
                f.write(chunk)
            f.write(b"e" + STOP)  # APPENDS
    size = os.path.getsize(path)
    assert size < 2 * MiB
    assert_refused(path, rf"^'archive/data.pkl' unpacks to {2**28 + 11} bytes, more than "
                         rf"{4 * size + MiB} allowed$", 8 * 2**27)


def test_state_set_on_a_tensor(tmp_path):
    # BUILD after the checks: {'size': (65536, 65536), 'stride': (0, 0)}.
    state = s("size") + tup(i(65536), i(65536)) + s("stride") + tup(i(0), i(0))
    evil = b"}" + MARK + state + b"u" + b"b"  # EMPTY_DICT MARK ... SETITEMS, BUILD
    pkl = state_dict([("w", tensor(pid("0", 4), 0, (4,), (1,)) + evil)])
    path = write_zip(tmp_path / "a.pth", pkl, [("0", FLOATS4[0][2])])
    assert_refused(path, r"refusing pickled state for a Tensor$", 4 * 2**32)


def test_truncated_string_legacy(tmp_path):
    # BINUNICODE declaring 4 GiB; a file-backed unpickler reserves it up front.
    pkl = PROTO + b"}" + b"X" + struct.pack("<I", 2**32 - 1) + b"abc" + STOP
    path = write_legacy(tmp_path / "a.pth", pkl)
    assert_refused(path, r"malformed pickle: expected 4294967295 bytes in a unicodestring4, "
                         r"but only \d+ remain$", 2**32)


def test_opcode_cap(tmp_path, monkeypatch):
    # A list of 2,000 memo gets is fine at the real cap, refused at a cap of 1,000.
    pkl = PROTO + b"]" + put(0) + MARK + b"h\x00" * 2000 + b"e" + STOP
    path = write_zip(tmp_path / "a.pth", pkl)
    with pytest.raises(torchfile.UnsafeTorchFile, match="top-level object is list"):
        torchfile.load_state_dict(path)
    monkeypatch.setattr(torchfile, "_MAX_PICKLE_OPS", 1000)
    with pytest.raises(torchfile.UnsafeTorchFile, match=r"pickle has more than 1000 opcodes$"):
        torchfile.load_state_dict(path)


# ---------------------------------------------------------------- honest --

@fmts
def test_hand_made_file_round_trips(tmp_path, fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(12).astype("<f4")
    w[5] = np.nan
    ids = np.array([-1, 2**40, 7], "<i8")
    view = ("0v", 2, 6)  # legacy only: a view of elements 2..7 of storage 0

    def pkl(legacy):
        def w_storage(view=None):
            return pid("0", 12, legacy=legacy, view=view)
        entries = [
            ("conv.weight", tensor(w_storage(), 0, (3, 4), (4, 1))),
            ("conv.weight_t", tensor(w_storage(), 0, (4, 3), (1, 4))),  # transposed
            ("bn.bias", tensor(w_storage(), 1, (3,), (3,))),  # offset + stride
            ("ids", tensor(pid("1", 3, "LongStorage", legacy), 0, (3,), (1,))),
            ("count", tensor(pid("1", 3, "LongStorage", legacy), 2, (), ())),  # 0-d
            ("empty", tensor(pid("2", 0, legacy=legacy), 0, (0, 5), (5, 1))),
        ]
        if legacy:
            entries.append(("viewed", tensor(w_storage(view), 1, (2,), (2,))))
        return state_dict(entries)

    path = write(fmt, tmp_path / "ok.pth", pkl,
                 [("0", "<f4", w.tobytes()), ("1", "<i8", ids.tobytes()), ("2", "<f4", b"")])
    got = torchfile.load_state_dict(path)
    want = {
        "conv.weight": w.reshape(3, 4), "conv.weight_t": w.reshape(3, 4).T,
        "bn.bias": w[1:10:3], "ids": ids, "count": ids[2], "empty": np.zeros((0, 5), "<f4"),
    }
    if fmt == "legacy":
        want["viewed"] = w[2:8][1:4:2]
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name  # NaN too
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name

"""beamzoo.isolate: limits enforced outside the decoder, in worker processes that can be killed.

The functions the workers run are defined here, at module level: workers import
this module by name (``test_isolate``; ``tests/`` is on ``sys.path``, which
multiprocessing passes on to them).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

import badfiles
from beamzoo.core.isolate import IsolatedPool, IsolationFailure, Limits
from beamzoo.imaging import decode
from conftest import ROOT


def decode_bgr(data: bytes) -> np.ndarray:
    return decode(data, 100_000_000, None, "BGR")


def misbehave(item):
    """Each item names what to do; anything else comes back squared."""
    if item == "sleep":
        time.sleep(30)
    elif item == "spin":
        while True:
            pass
    elif item == "allocate":
        return np.ones(4 << 30, np.uint8)
    elif item == "exit":
        os._exit(3)
    elif item == "segfault":
        ctypes.string_at(0)
    elif item == "raise":
        raise ValueError("this file is corrupt")
    return item * item


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def jpeg(scale: float = 1.0) -> bytes:
    img = badfiles.photo()
    if scale != 1.0:
        img = cv2.resize(img, None, fx=scale, fy=scale)
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_real_decodes_come_back_in_order_and_equal_in_process():
    files = [jpeg(s) for s in (1.0, 0.5, 2.0, 1.5, 0.75, 1.25)]
    with IsolatedPool(decode_bgr, 2, Limits()) as pool:
        out = pool.map(files)
        assert pool.map([]) == []
    assert len(out) == len(files)
    for data, got in zip(files, out):
        want = decode_bgr(data)
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        got[0, 0, 0] = 1  # results are writable arrays, not views of a read-only buffer


def test_corrupt_file_gives_error_with_the_exception_and_the_worker_goes_on():
    with IsolatedPool(decode_bgr, 1, Limits()) as pool:
        assert isinstance(pool.map([jpeg()])[0], np.ndarray)
        pid = pool.pids()
        bad, good = pool.map([b"this is a text file, not a JPEG\n", jpeg()])
        assert isinstance(bad, IsolationFailure) and bad.kind == "error"
        assert bad.message.startswith("ValueError: not an image in a known format")
        assert isinstance(good, np.ndarray)
        assert pool.pids() == pid  # an ordinary exception does not cost a worker


def test_sleep_gives_timeout_within_the_limit_and_the_rest_succeed():
    items = [1, 2, "sleep", 3, 4, 5, 6]
    with IsolatedPool(misbehave, 2, Limits(seconds=1.0)) as pool:
        pool.map([0, 0])  # warm
        t = time.monotonic()
        out = pool.map(items)
        took = time.monotonic() - t
        assert took < 1.0 + 1
        assert out[2].kind == "timeout" and "1 s" in out[2].message
        assert [out[i] for i in (0, 1, 3, 4, 5, 6)] == [1, 4, 9, 16, 25, 36]
        assert pool.map([7, 8]) == [49, 64]  # the replacement works


def test_cpu_spin_gives_timeout_from_the_cpu_limit():
    with IsolatedPool(misbehave, 1, Limits(seconds=20, cpu_seconds=1)) as pool:
        t = time.monotonic()
        (out,) = pool.map(["spin"])
        assert out.kind == "timeout" and "CPU" in out.message
        assert time.monotonic() - t < 5
        assert pool.map([3]) == [9]


def test_allocating_4_gib_under_a_1_gib_limit_gives_memory():
    with IsolatedPool(misbehave, 1, Limits(memory_bytes=1 << 30)) as pool:
        out = pool.map([2, "allocate", 3])
        assert out[0] == 4 and out[2] == 9
        assert out[1].kind == "memory" and "MemoryError" in out[1].message


def decode_big(data: bytes) -> np.ndarray:
    return decode(data, 10**9, None, "BGR")


def test_a_real_decoder_bomb_under_the_memory_limit_gives_memory():
    """A 100-byte PNG declaring 20000x20000 pixels: OpenCV asks for 1.2 GB before reading any."""
    with IsolatedPool(decode_big, 1, Limits(memory_bytes=512 << 20)) as pool:
        bomb, good = pool.map([badfiles.png_bomb(20000, 20000), jpeg()])
    assert bomb.kind == "memory" and "Failed to allocate 1200000000 bytes" in bomb.message
    np.testing.assert_array_equal(good, decode_bgr(jpeg()))


@pytest.mark.parametrize("item, words", [("exit", "exited with code 3"), ("segfault", "SIGSEGV")])
def test_dying_worker_gives_crash(item, words):
    with IsolatedPool(misbehave, 1, Limits()) as pool:
        assert pool.map([1]) == [1]
        first = pool.pids()
        out = pool.map([2, item, 3])
        assert out[0] == 4 and out[2] == 9
        assert out[1].kind == "crash" and words in out[1].message
        assert not any(alive(p) for p in first)


def test_two_threads_mapping_at_once_both_get_their_answers():
    results = {}
    with IsolatedPool(decode_bgr, 2, Limits()) as pool:
        files = {name: [jpeg(s) for s in scales] for name, scales in
                 (("a", (0.5, 1.0, 1.5, 0.6) * 4), ("b", (2.0, 0.7, 1.2, 0.4) * 4))}

        def worker(name):
            results[name] = pool.map(files[name])

        threads = [threading.Thread(target=worker, args=(n,)) for n in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for name, data in files.items():
        assert len(results[name]) == len(data)
        for d, got in zip(data, results[name]):
            np.testing.assert_array_equal(got, decode_bgr(d))


def wait_for_workers(pool: IsolatedPool, n: int) -> list[int]:
    """The pool's worker pids once ``n`` are up (a replacement starts just after a failure is reported)."""
    deadline = time.monotonic() + 10
    while len(pool.pids()) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return pool.pids()


def children(ppid: int) -> set[int]:
    """Live children of ``ppid``, from /proc."""
    found = set()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[1] == str(ppid) and fields[0] != "Z":
            found.add(int(name))
    return found


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_close_stops_every_worker():
    pool = IsolatedPool(misbehave, 3, Limits())
    assert pool.map(list(range(9))) == [i * i for i in range(9)]
    pids = wait_for_workers(pool, 3)
    assert len(pids) == 3 and all(alive(p) for p in pids)
    pool.close()
    assert not any(alive(p) for p in pids)
    pool.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        pool.map([1])


def test_twenty_timeouts_in_a_row_leak_no_process():
    seen = set()
    with IsolatedPool(misbehave, 1, Limits(seconds=0.1)) as pool:  # one worker: each timeout is its own
        server = parent_of(wait_for_workers(pool, 1)[0])  # workers are forks of multiprocessing's fork server
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            seen.update(wait_for_workers(pool, 1))
            assert [o.kind for o in pool.map(["sleep"])] == ["timeout"]
        assert pool.map([1, 2, 3]) == [1, 4, 9]
        live = set(wait_for_workers(pool, 1))
        assert len(seen) == 20 and not seen & live  # each timed-out worker was replaced
        assert not any(alive(p) for p in seen)
        assert children(server) >= live and not children(server) & seen
        assert len(os.listdir("/proc/self/fd")) == fds
    assert not any(alive(p) for p in seen | live)


CHILD = """
import os, signal, sys
from beamzoo.core.isolate import IsolatedPool, Limits
pool = IsolatedPool(len, 2, Limits())
assert pool.map([b"ab"] * 4) == [2] * 4
while len(pool.pids()) < 2:
    pass
server = int(open(f"/proc/{pool.pids()[0]}/stat").read().rsplit(")", 1)[1].split()[1])
print(" ".join(map(str, pool.pids() + [server])), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_die_with_the_parent():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]  # the two workers and the fork server
    assert len(pids) == 3
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


@pytest.mark.parametrize("runner", ["EdgeRunner", "DirectRunner"])
def test_a_users_script_without_a_main_guard_runs_and_leaves_no_process(tmp_path, colour_dir, runner):
    """The decode workers start from beamzoo's own modules: they never run the user's script again
    (which, without ``if __name__ == "__main__":``, would start the pipeline once more in each)."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import beamzoo as bz\n"
        "p = bz.Pipeline()\n"
        f"preds = p | bz.Files({str(colour_dir / '*.png')!r}) | bz.Classify('efficientnet_lite0', topk=1)\n"
        f"preds | bz.WriteParquet({str(tmp_path / 'out' / 'predictions')!r})\n"
        f"p.dead_letters | bz.WriteParquet({str(tmp_path / 'out' / 'dead_letter')!r})\n"
        f"print(p.run(['--runner={runner}']).line())\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inputs: 3  scored: 3  dead letters: 0" in done.stdout and done.stdout.count("inputs:") == 1
    assert "Traceback" not in done.stderr
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if str(script).encode() in cmd:
                left.append(pid)
    assert left == []

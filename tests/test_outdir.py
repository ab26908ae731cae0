"""beamzoo.outdir: one run per output folder, across real processes."""
from __future__ import annotations

import glob
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from beamzoo.outdir import LOCK_NAME, OutputLocked, escaped, lock_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Takes the lock, says "locked", and holds it until stdin gets a line (or it
# is killed); then prints "released" after the with-block has exited.
HOLDER = """
import sys
from beamzoo.outdir import lock_output
with lock_output(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def _readline(proc, timeout=30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child said nothing within {timeout}s"
    return proc.stdout.readline().strip()


@pytest.fixture
def spawn():
    procs = []

    def start(folder, script=HOLDER):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-c", script, str(folder)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f:
                f.close()


def _info(folder):
    with open(os.path.join(folder, LOCK_NAME)) as f:
        return json.load(f)


def test_second_locker_fails_at_once_naming_the_holder(tmp_path, spawn):
    out = tmp_path / "new" / "out"  # created by the lock
    child = spawn(out)
    assert _readline(child) == "locked"
    assert _info(out)["pid"] == child.pid
    t0 = time.monotonic()
    with pytest.raises(OutputLocked) as e:
        with lock_output(str(out)):
            pytest.fail("took a lock that a live process holds")
    assert time.monotonic() - t0 < 0.5
    msg = str(e.value)
    assert f"pid {child.pid} on host {socket.gethostname()}" in msg
    assert str(out) in msg and "choose another --output" in msg
    assert "started 20" in msg
    assert _info(out)["pid"] == child.pid  # the failed attempt wrote nothing


def test_lock_of_a_killed_process_is_taken_over(tmp_path, spawn):
    child = spawn(tmp_path)
    assert _readline(child) == "locked"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert _info(tmp_path)["pid"] == child.pid  # stale info left behind
    with lock_output(str(tmp_path)) as path:
        assert path == str(tmp_path / LOCK_NAME)
        info = _info(tmp_path)
        assert info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname()
        assert info["argv"] == sys.argv[:8]
        assert info["started"].endswith("+00:00")
    assert (tmp_path / LOCK_NAME).read_text() == ""  # cleared, left in place


def test_clean_release_lets_another_process_lock(tmp_path, spawn):
    with lock_output(str(tmp_path)):
        child = spawn(tmp_path)
        _, err = child.communicate(timeout=30)
        assert child.returncode != 0 and f"pid {os.getpid()} " in err
    assert (tmp_path / LOCK_NAME).read_text() == ""
    child = spawn(tmp_path)
    assert _readline(child) == "locked"
    child.stdin.write("\n")
    child.stdin.flush()
    assert _readline(child) == "released"
    assert child.wait(30) == 0
    with lock_output(str(tmp_path)):
        assert _info(tmp_path)["pid"] == os.getpid()


# Takes the lock, starts a long-lived program that inherits every fd it can
# (close_fds=False), prints its pid, and waits to be killed.
SPAWNER = """
import subprocess, sys
from beamzoo.outdir import lock_output
with lock_output(sys.argv[1]):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         close_fds=False)
    print(p.pid, flush=True)
    sys.stdin.readline()
"""


def test_program_started_by_a_killed_run_does_not_keep_the_lock(tmp_path, spawn):
    run = spawn(tmp_path, SPAWNER)
    sleeper = int(_readline(run))
    try:
        run.kill()
        run.wait(10)
        os.kill(sleeper, 0)  # still alive: without O_CLOEXEC it would hold the lock
        with lock_output(str(tmp_path)):
            assert _info(tmp_path)["pid"] == os.getpid()
    finally:
        os.kill(sleeper, signal.SIGKILL)


def test_forked_child_leaving_the_lock_does_not_release_the_parent(tmp_path, spawn):
    lock = lock_output(str(tmp_path))
    lock.__enter__()
    try:
        pid = os.fork()
        if pid == 0:  # a forked worker that unwinds through the with-block
            try:
                lock.__exit__(None, None, None)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        assert _info(tmp_path)["pid"] == os.getpid()  # not cleared by the child
        other = spawn(tmp_path)
        _, err = other.communicate(timeout=30)
        assert other.returncode != 0 and "OutputLocked" in err
    finally:
        lock.__exit__(None, None, None)
    child = spawn(tmp_path)
    assert _readline(child) == "locked"


def test_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / LOCK_NAME)
    with pytest.raises(OutputLocked, match="symlink"):
        with lock_output(str(out)):
            pytest.fail("locked through a symlink")
    assert target.read_text() == "do not touch\n"
    assert os.path.islink(out / LOCK_NAME)


def test_non_regular_lock_path_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(OutputLocked, match="not a regular file"):
        with lock_output(str(tmp_path)):
            pytest.fail("locked a directory")
    os.rmdir(tmp_path / LOCK_NAME)
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(OutputLocked, match="not a regular file"):
        with lock_output(str(tmp_path)):
            pytest.fail("locked a FIFO")


@pytest.mark.parametrize("real, sibling", [
    ("res?1", "resA1"), ("out*", "outX"), ("outdir[1]", "outdir1")])
def test_escaped_globs_only_the_real_folder(tmp_path, real, sibling):
    for name in (real, sibling):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.parquet").write_text("x")
    folder = str(tmp_path / real)
    naive = glob.glob(os.path.join(folder, "*.parquet"))
    assert [os.path.basename(p) for p in naive] != [f"{real}.parquet"]  # the bug
    assert glob.glob(escaped(folder, "*.parquet")) == [os.path.join(folder, f"{real}.parquet")]
    assert escaped(folder, "sub", "*.parquet").endswith(os.path.join("sub", "*.parquet"))

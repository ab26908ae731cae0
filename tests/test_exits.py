"""How score_images.py ends, in real processes: Ctrl-C (a real SIGINT, at different moments,
on every runner, every time) exits 130 with one line; a user's mistake prints one ``error:``
line, exit 2; a failure of the program or its surroundings a traceback, exit 1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import cv2
import pytest

from badfiles import photo
from conftest import ROOT

pytestmark = pytest.mark.integration


def linked_photos(d, n: int):
    cv2.imwrite(str(d / "0000.jpg"), cv2.resize(photo(), (640, 480)))
    for i in range(1, n):
        os.link(d / "0000.jpg", d / f"{i:04d}.jpg")
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return linked_photos(tmp_path_factory.mktemp("photos"), 2000)  # no run ends before its SIGINT, even on a quiet machine


@pytest.fixture(scope="module")
def some_photos(tmp_path_factory):
    """Fewer: a run interrupted at its first written row still has hundreds to go."""
    return linked_photos(tmp_path_factory.mktemp("some_photos"), 500)


def start(photos, out, runner: str = "EdgeRunner") -> subprocess.Popen:
    """score_images.py on ``photos``, once it holds its output lock."""
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--input", str(photos / "*.jpg"),
           "--output", str(out), f"--runner={runner}", "--no_progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not (out / ".beamzoo.lock").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def interrupt(photos, out, runner: str, after: float) -> subprocess.CompletedProcess:
    """Start score_images.py; once it holds its output lock, wait ``after`` s and send SIGINT."""
    proc = start(photos, out, runner)
    time.sleep(after)
    assert proc.poll() is None, "the run ended before it was interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("runner, moments", [
    ("EdgeRunner", (0.2, 1.0, 2.0)),
    ("DirectRunner", (0.5, 2.0, 3.0, 4.0, 5.0)),
    pytest.param("FlinkRunner", (8.0,), marks=pytest.mark.flink),
])
def test_ctrl_c_exits_130_with_one_line(photos, tmp_path, runner, moments):
    for i, after in enumerate(moments):
        done = interrupt(photos, tmp_path / f"out{i}", runner, after)
        assert done.returncode == 130, f"after {after} s: exit {done.returncode}\n{done.stderr[-3000:]}"
        assert done.stderr.splitlines()[-1] == "interrupted", done.stderr[-3000:]
        for bad in ("Traceback", "terminate called", "Process _Process"):
            assert bad not in done.stderr, done.stderr[-3000:]


def test_user_mistakes_are_one_error_line_and_exit_2(photos, tmp_path):
    run = [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--runner=EdgeRunner", "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run([*run, "--input", str(tmp_path / "nothing" / "*.jpg"), "--output", str(tmp_path / "a")],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert missing.returncode == 2 and missing.stderr.splitlines()[-1].startswith("error: no files match")
    assert "Traceback" not in missing.stderr
    first = str(sorted(photos.glob("*.jpg"))[0])
    done = [*run, "--input", first, "--output", str(tmp_path / "b")]
    assert subprocess.run(done, capture_output=True, cwd=ROOT, env=env, timeout=300).returncode == 0
    again = subprocess.run(done, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert again.returncode == 2 and "already holds results of an earlier run; pass --resume" in again.stderr
    assert again.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in again.stderr


def test_a_failure_that_is_no_user_mistake_is_a_traceback_and_exit_1(photos, tmp_path):
    """The predictions folder vanishes during the run (another process removed it): committing
    the results fails with a FileNotFoundError, which is not the user's mistake."""
    import shutil
    out = tmp_path / "out"
    proc = start(photos, out)
    while not (out / "predictions").exists() and proc.poll() is None:
        time.sleep(0.02)
    shutil.rmtree(out / "predictions")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "Traceback (most recent call last)" in stderr and "FileNotFoundError" in stderr.splitlines()[-1]
    assert not any(line.startswith("error:") for line in stderr.splitlines())


def test_after_ctrl_c_only_the_main_thread_writes_to_stderr():
    """Beam's SDK worker prints a failed bundle's traceback itself, from its own thread,
    when the job server goes away during Ctrl-C; once interrupted, such lines are dropped."""
    code = ("import sys, threading; from beamzoo.runners.beam import _quiet_job_reader\n"
            "say = lambda: print('Traceback (most recent call last): from a worker', file=sys.stderr)\n"
            "say(); _quiet_job_reader()\n"
            "t = threading.Thread(target=say); t.start(); t.join()\n"
            "print('interrupted', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("from a worker") == 1 and done.stderr.splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_edge_run_commits_what_it_wrote_and_a_resume_goes_on_from_there(some_photos, tmp_path, sig,
                                                                                       code, word):
    out = tmp_path / "out"
    proc = start(some_photos, out)
    deadline = time.monotonic() + 300
    while not list((out / "predictions").glob(".beamzoo-*.tmp")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)  # rows are being written to a file not yet committed
    assert proc.poll() is None, "the run ended before it was interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code and stderr.splitlines()[-1] == word, stderr[-3000:]
    assert "Traceback" not in stderr
    import pyarrow.parquet as pq
    committed = [f for f in (out / "predictions").glob("part-*.parquet")]
    kept = sum(pq.read_metadata(f).num_rows for f in committed)
    assert kept > 0 and not list((out / "predictions").glob(".beamzoo-*.tmp"))  # committed, none left half-done
    resumed = subprocess.run([*proc.args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"inputs: 500  scored: {500 - kept}  dead letters: 0  already done: {kept}" in resumed.stdout

"""The score pipeline on Apache Flink (Beam's portable FlinkRunner): embedded, on a
local standalone cluster, and through the loss of a TaskManager."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter

import cv2
import pytest

from badfiles import photo
from beamzoo.runners import flink
from beamzoo.runners.job_server import class_archive
from conftest import flink_rest, subtask_reads
from beamzoo.samples import make_sample_set
from beamzoo.transforms.io import list_files
from conftest import ROOT, assert_same_rows, read
from test_score_images import images, score, score_cmd  # noqa: F401 - images is a fixture

pytestmark = [
    pytest.mark.flink,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime (17)"),
]


@pytest.fixture(scope="module")
def edge_out(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge")
    score("--input", str(images), "--output", str(out), "--runner=EdgeRunner")
    return out


def assert_same_as_edge(out, edge_out):
    assert_same_rows(read(out), read(edge_out))
    assert read(out, "dead_letter") == read(edge_out, "dead_letter")


def test_embedded_flink_gives_the_same_rows(images, edge_out, tmp_path):
    log = score("--input", str(images), "--output", str(tmp_path), "--runner=FlinkRunner", "--flink_master=[local]")
    assert "inputs: 24  scored: 19  dead letters: 5" in log
    assert_same_as_edge(tmp_path, edge_out)
    # when the first prediction reached the writer, from Beam's metrics
    took, first = map(float, re.search(r"over ([0-9.]+) s \(first result after ([0-9.]+) s\)", log).groups())
    assert 0 < first <= took
    # the job server beamzoo started is gone, and left a class-data archive for the next runs
    assert not _job_servers()
    assert class_archive(str(flink.job_server_jar(fetch=False))).stat().st_size > 1 << 20


def _job_servers() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "beamzoo-job-server-" in line]


def test_standalone_flink_gives_the_same_rows_and_spreads_the_work(flink_cluster, images, edge_out, tmp_path):
    log = score("--input", str(images), "--output", str(tmp_path), "--runner=FlinkRunner",
                f"--flink_master={flink_cluster['rest']}")
    assert "inputs: 24  scored: 19  dead letters: 5" in log
    assert_same_as_edge(tmp_path, edge_out)
    # Flink's own figures: every subtask of the scoring operator read records (Flink names a fused
    # vertex by the first part of its transforms' names: the classify composite's steps are "classify").
    read_counts = subtask_reads("classify,")  # the stage that scores: "{files, ..., stat_key+classify, ...}"
    assert len(read_counts) == 2 and min(read_counts) > 0, read_counts


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """240 real photographs (the samples, re-encoded at several sizes)."""
    d = tmp_path_factory.mktemp("many")
    sources = [cv2.imread(str(p)) for p in list_files(str(make_sample_set(d / "src")))]
    for i in range(240):
        img = sources[i % len(sources)]
        scale = 0.5 + (i % 7) / 10
        small = cv2.resize(img, (int(img.shape[1] * scale), int(img.shape[0] * scale)))
        cv2.imwrite(str(d / f"photo{i:04d}.jpg"), small)
    cv2.imwrite(str(d / "cat.jpg"), photo())
    shutil.rmtree(d / "src")
    return d


def test_losing_a_taskmanager_mid_run_loses_and_duplicates_nothing(flink_cluster, many_photos, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        score_cmd("--input", str(many_photos / "*.jpg"), "--output", str(out), "--runner=FlinkRunner",
                  f"--flink_master={flink_cluster['rest']}"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the scoring operator is running, then kill the TaskManager's JVM.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            running = [j for j in flink_rest("/jobs/overview")["jobs"] if j["state"] == "RUNNING"]
            if running and running[0]["tasks"]["running"] > 0:
                break
            time.sleep(0.5)
        time.sleep(3)
        assert proc.poll() is None, "the job ended before the TaskManager could be killed"
        [tm] = flink.taskmanager_pids()
        os.kill(tm, signal.SIGKILL)
        flink.start_taskmanager()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    inputs = list_files(str(many_photos / "*.jpg"))
    assert f"inputs: {len(inputs)}  scored: {len(inputs)}  dead letters: 0" in stdout
    paths = Counter(r["path"] for r in read(out))
    assert set(paths) == set(inputs) and set(paths.values()) == {1}
    job = max(flink_rest("/jobs/overview")["jobs"], key=lambda j: j["start-time"])
    assert job["state"] == "FINISHED"
    exceptions = flink_rest(f"/jobs/{job['jid']}/exceptions")
    assert exceptions.get("exceptionHistory", {}).get("entries") or exceptions.get("root-exception"), \
        "Flink recorded no failure: the TaskManager was not lost mid-job"

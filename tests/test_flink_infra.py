"""Real Beam pipelines on the real portable FlinkRunner: embedded and on a
local standalone cluster (JobManager + TaskManager JVMs, EXTERNAL workers).

The first run fetches the job server jar (Maven) and the Flink distribution
(pip) into the cache; see beamzoo/runners/flink.py.  Never DirectRunner here:
since Beam 2.68 it tries to download Prism.
"""
from __future__ import annotations

import os
import shutil

import pytest

from beamzoo.runners import flink
from conftest import subtask_reads

pytestmark = [
    pytest.mark.flink,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime (17)"),
    # LOOPBACK workers' gRPC reader threads end with CANCELLED when a job is done
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

N = 200


def run_squares(out_dir, args) -> list[tuple[int, int, int]]:
    """Create -> Reshuffle -> (worker pid, x, x*x) -> text files; the rows."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(args)) as p:
        (
            p
            | beam.Create(list(range(N)))
            | beam.Reshuffle()
            # a lambda is pickled by value: the EXTERNAL workers cannot import this test module
            | "Square" >> beam.Map(lambda x: f"{os.getpid()},{x},{x * x}")
            | beam.io.WriteToText(str(out_dir / "squares"))
        )
    files = sorted(out_dir.glob("squares-*"))
    assert files, "the pipeline wrote nothing"
    return [tuple(map(int, line.split(","))) for f in files for line in f.read_text().splitlines()]


def check_squares(rows):
    assert sorted((x, sq) for _, x, sq in rows) == [(x, x * x) for x in range(N)]


def test_embedded_local_loopback(tmp_path):
    rows = run_squares(tmp_path, flink.pipeline_args("[local]"))
    check_squares(rows)
    # LOOPBACK: the SDK workers are threads of this very process
    assert {pid for pid, _, _ in rows} == {os.getpid()}


def test_standalone_cluster_external_workers(flink_cluster, tmp_path):
    cluster = flink_cluster
    assert cluster["overview"]["taskmanagers"] >= 1
    assert cluster["overview"]["slots-total"] >= 2
    rows = run_squares(tmp_path, flink.pipeline_args(cluster["rest"], parallelism=2))
    check_squares(rows)
    worker_pids = {pid for pid, _, _ in rows}
    cluster["seen_worker_pids"] |= worker_pids
    assert os.getpid() not in worker_pids  # EXTERNAL: the pool's worker processes did the work
    # Both subtasks of the squaring step got elements (which worker process serves
    # a subtask is the TaskManager's choice, so the pids alone prove nothing).
    assert min(subtask_reads("Square")) > 0
    overview = flink.cluster_status()["overview"]
    assert overview["jobs-finished"] >= 1 and overview["jobs-failed"] == 0, overview

"""The same graph on the edge runner and on Beam's in-process runner gives the same rows."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badfiles import make_all
from beamzoo.pipeline import run, score_images
from beamzoo.runners import EdgeRunner
from beamzoo.runners.sinks import ParquetSink, count_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(directory: str, prefix: str) -> list[dict]:
    files = glob.glob(os.path.join(directory, f"{prefix}-*.parquet"))
    assert files, f"no {prefix} files in {directory}"
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["path"])


@pytest.fixture
def mixed_dir(colour_dir):
    make_all(colour_dir / "odd", big_side=400)
    return colour_dir


def assert_same_rows(a: list[dict], b: list[dict], tol=1e-5):
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and x["topk_labels"] == y["topk_labels"]
        assert abs(x["score"] - y["score"]) <= tol
        assert all(abs(p - q) <= tol for p, q in zip(x["topk_scores"], y["topk_scores"]))


def test_edge_and_direct_runner_give_the_same_rows(tmp_path, mixed_dir, tiny_model):
    graph = score_images(str(mixed_dir / "**" / "*"), tiny_model, k=2, batch_size=4)
    edge = run(graph, str(tmp_path / "edge"), "EdgeRunner", edge=EdgeRunner(workers=2, chunk_size=3, progress=False))
    direct = run(graph, str(tmp_path / "direct"), "DirectRunner")

    inputs = len(glob.glob(str(mixed_dir / "**" / "*"), recursive=True)) - 2  # less the two folders
    for stats in (edge, direct):
        assert stats.inputs == inputs == 21
        assert stats.scored + stats.failed == stats.inputs
        assert stats.failed == 5
        assert stats.first_result_s is not None and 0 < stats.first_result_s <= stats.seconds
    a, b = read(str(tmp_path / "edge"), "predictions"), read(str(tmp_path / "direct"), "predictions")
    assert_same_rows(a, b)
    colours = {r["path"].split("/")[-1]: r["label"] for r in a}
    assert colours["red0.png"] == "red" and colours["green4.png"] == "green" and colours["blue8.png"] == "blue"
    assert read(str(tmp_path / "edge"), "dead_letter") == read(str(tmp_path / "direct"), "dead_letter")


def test_edge_runner_bounded_queue_and_small_batches(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "**" / "*.*"), tiny_model, k=3, batch_size=2)
    stats = EdgeRunner(workers=1, chunk_size=1, queue_depth=1, progress=False).run(graph, str(tmp_path))
    assert (stats.inputs, stats.scored, stats.failed) == (9, 9, 0)
    assert stats.first_result_s is not None and stats.first_result_s <= stats.seconds
    assert count_rows(str(tmp_path), "predictions") == 9
    (file,) = glob.glob(str(tmp_path / "predictions-*.parquet"))
    assert pq.ParquetFile(file).metadata.num_row_groups == 1  # not one per batch of 2


def test_sink_writes_row_groups_of_the_set_size_and_commits_whole_files(tmp_path):
    schema = pa.schema([pa.field("path", pa.string())])
    with ParquetSink(str(tmp_path), "predictions", schema, "r", rows_per_file=7, row_group_rows=3) as sink:
        for i in range(10):
            sink.write(pa.record_batch([pa.array([f"p{i}"])], schema=schema))
    files = sorted(glob.glob(str(tmp_path / "predictions-*.parquet")))
    groups = [[pq.ParquetFile(f).metadata.row_group(g).num_rows
               for g in range(pq.ParquetFile(f).metadata.num_row_groups)] for f in files]
    assert groups == [[3, 3, 1], [3]]
    assert pq.read_table(files[0]).column("path").to_pylist() == [f"p{i}" for i in range(7)]


def test_failed_edge_run_leaves_no_output_files(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "*.png"), tiny_model, k=3)
    step = graph.steps[-1]
    step.process = lambda batch: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        EdgeRunner(progress=False).run(graph, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_no_matching_files_is_a_clear_error(tmp_path, tiny_model):
    graph = score_images(str(tmp_path / "nothing" / "*.jpg"), tiny_model, k=3)
    with pytest.raises(FileNotFoundError, match="no files match .*quote it"):
        run(graph, str(tmp_path / "out"), "EdgeRunner")


def test_edge_runner_works_where_apache_beam_cannot_be_imported(tmp_path, colour_dir, tiny_model):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["apache_beam"] = None  # any import of Beam now raises ImportError
        from beamzoo.pipeline import run, score_images
        from beamzoo.runners import EdgeRunner
        from beamzoo.zoo import ModelCard
        from beamzoo.schemas import TensorSpec
        card = ModelCard(**{dict(name="tiny_colour", version="1", input_name="images",
                                 output_name="logits", labels=("red", "green", "blue"),
                                 path=tiny_model.path, resize=36)!r},
                         input=TensorSpec("float32", (3, 32, 32), "NCHW", "RGB", (-1, 1)),
                         output=TensorSpec("float32", (3,), "NC"))
        stats = run(score_images({str(colour_dir / '*')!r}, card, k=3), {str(tmp_path)!r}, "EdgeRunner",
                    edge=EdgeRunner(progress=False))
        assert not any(m == "apache_beam" or m.startswith("apache_beam.")
                       for m, v in sys.modules.items() if v is not None)
        print(stats.line())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "inputs: 6  scored: 6  dead letters: 0" in out.stdout


def test_beam_metrics_count_rows_and_failures(tmp_path, mixed_dir, tiny_model):
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beamzoo.transforms.beam import ScoreToParquet

    graph = score_images(str(mixed_dir / "odd" / "*"), tiny_model, k=3)
    p = beam.Pipeline(runner=FnApiRunner())
    p | ScoreToParquet(graph, str(tmp_path))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("beamzoo"))["counters"]}
    assert counters["read_failed"] == 1 and counters["decode_failed"] == 4
    assert counters["scored"] == 7 and counters["failed"] == 5


def test_cancelled_worker_stream_at_job_end_is_not_reported():
    import threading

    import grpc

    from beamzoo.runners.beam import quiet_worker_shutdown

    class Cancelled(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.CANCELLED

    def fail(exc):
        raise exc

    reported = []
    before = threading.excepthook
    threading.excepthook = lambda args: reported.append((args.thread.name, type(args.exc_value).__name__))
    try:
        quiet_worker_shutdown()
        for name, exc in (("read_grpc_client_inputs", Cancelled()), ("read_grpc_client_inputs", ValueError("real")),
                          ("other", Cancelled())):
            t = threading.Thread(target=fail, args=(exc,), name=name)
            t.start()
            t.join()
    finally:
        threading.excepthook = before
    assert reported == [("read_grpc_client_inputs", "ValueError")]

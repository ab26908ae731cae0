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
from beamzoo.core import Operator, register
from beamzoo.core.graph import Graph
from beamzoo.pipeline import Pipeline, score_images
from beamzoo.runners.edge import EdgeRunner
from beamzoo.runners.sinks import ParquetSink, count_rows
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files
from conftest import ROOT, assert_same_rows, read, run_graph


@pytest.fixture
def mixed_dir(colour_dir):
    make_all(colour_dir / "odd", big_side=400)
    return colour_dir


def test_edge_and_direct_runner_give_the_same_rows(tmp_path, mixed_dir, tiny_model):
    results = {}
    for runner in ("EdgeRunner", "DirectRunner"):
        graph = score_images(str(mixed_dir / "**" / "*"), str(tmp_path / runner), tiny_model, topk=2)
        results[runner] = run_graph(graph, runner)
    inputs = len(glob.glob(str(mixed_dir / "**" / "*"), recursive=True)) - 2  # less the two folders
    for stats in results.values():
        assert (stats.inputs, stats.failed) == (inputs, 5) == (21, 5)
        assert stats.scored + stats.failed == stats.inputs
        assert stats.first_result_s is not None and 0 < stats.first_result_s <= stats.seconds
    a, b = read(tmp_path / "EdgeRunner"), read(tmp_path / "DirectRunner")
    assert_same_rows(a, b)
    colours = {os.path.basename(r["path"]): r["label"] for r in a}
    assert colours["red0.png"] == "red" and colours["green4.png"] == "green" and colours["blue8.png"] == "blue"
    assert read(tmp_path / "EdgeRunner", "dead_letter") == read(tmp_path / "DirectRunner", "dead_letter")


def test_outputs_are_two_folders_that_pandas_reads(tmp_path, mixed_dir, tiny_model, runner):
    import pandas as pd
    run_graph(score_images(str(mixed_dir / "**" / "*"), str(tmp_path), tiny_model, topk=2), runner)
    preds = pd.read_parquet(tmp_path / "predictions")
    dead = pd.read_parquet(tmp_path / "dead_letter")
    assert list(preds.columns) == ["id", "path", "key", "label", "score", "topk_labels", "topk_scores", "model"]
    assert list(dead.columns) == ["id", "source", "stage", "error", "key", "parent_id"]
    assert (len(preds), len(dead)) == (16, 5)


def test_edge_runner_bounded_queue_and_small_batches(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "**" / "*.*"), str(tmp_path), tiny_model, topk=3, batch_size=2)
    stats = run_graph(graph, edge=EdgeRunner(workers=1, chunk_size=1, queue_depth=1, progress=False))
    assert (stats.inputs, stats.scored, stats.failed) == (9, 9, 0)
    assert stats.first_result_s is not None and stats.first_result_s <= stats.seconds
    assert count_rows(str(tmp_path / "predictions")) == 9
    (file,) = glob.glob(str(tmp_path / "predictions" / "*.parquet"))
    assert pq.ParquetFile(file).metadata.num_row_groups == 1  # not one per batch of 2


def test_sink_writes_row_groups_of_the_set_size_and_commits_whole_files(tmp_path):
    schema = pa.schema([pa.field("path", pa.string())])
    with ParquetSink(str(tmp_path), schema, "r", rows_per_file=7, row_group_rows=3) as sink:
        for i in range(10):
            sink.write(pa.record_batch([pa.array([f"p{i}"])], schema=schema))
    files = sorted(glob.glob(str(tmp_path / "part-*.parquet")))
    groups = [[pq.ParquetFile(f).metadata.row_group(g).num_rows
               for g in range(pq.ParquetFile(f).metadata.num_row_groups)] for f in files]
    assert groups == [[3, 3, 1], [3]]
    assert pq.read_table(files[0]).column("path").to_pylist() == [f"p{i}" for i in range(7)]


@register("test_boom")
class Boom(Operator):
    """A step with a bug: it raises (not a bad record)."""

    default_id = "boom"

    def process(self, batch):
        raise RuntimeError("boom")


@pytest.mark.parametrize("runner_name", ["EdgeRunner", "DirectRunner"])
def test_a_failed_run_leaves_nothing_under_final_names(tmp_path, colour_dir, runner_name):
    p = Pipeline()
    p | Files(str(colour_dir / "*.png")) | Boom() | WriteParquet(tmp_path / "out" / "predictions")
    p.dead_letters | WriteParquet(tmp_path / "out" / "dead_letter", id="dead")
    with pytest.raises(Exception, match="boom"):
        run_graph(p.graph, runner_name)
    finals = [f for _, _, files in os.walk(tmp_path / "out") for f in files if f.endswith(".parquet")]
    assert finals == []


def test_no_matching_files_is_a_clear_error(tmp_path, tiny_model):
    graph = score_images(str(tmp_path / "nothing" / "*.jpg"), str(tmp_path / "out"), tiny_model, topk=3)
    with pytest.raises(FileNotFoundError, match="no files match .*quote it"):
        run_graph(graph)


def test_edge_runner_works_where_apache_beam_cannot_be_imported(tmp_path, colour_dir, tiny_model):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["apache_beam"] = None  # any import of Beam now raises ImportError
        from beamzoo.pipeline import run, score_images
        from beamzoo.runners.edge import EdgeRunner
        from beamzoo.zoo import card_of
        card = card_of({tiny_model.as_dict()!r})
        stats = run(score_images({str(colour_dir / '*')!r}, {str(tmp_path)!r}, card, topk=3), "EdgeRunner",
                    edge=EdgeRunner(progress=False))
        assert not any(m == "apache_beam" or m.startswith("apache_beam.")
                       for m, v in sys.modules.items() if v is not None)
        print(stats.line())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "inputs: 6  scored: 6  dead letters: 0" in out.stdout


def test_beam_metrics_count_every_step_s_rows_and_failures(tmp_path, mixed_dir, tiny_model):
    """In a user's own Beam pipeline too, beamzoo's steps report Beam metrics, per step."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beamzoo.runners.beam import translate

    graph = score_images(str(mixed_dir / "odd" / "*"), str(tmp_path), tiny_model, topk=3)
    p = beam.Pipeline(runner=FnApiRunner())
    translate(graph, p)
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace("beamzoo"))
    counters = {c.key.metric.name: c.committed for c in found["counters"]}
    assert counters["classify/read|dead"] == 1 and counters["classify/decode+resize|dead"] == 4
    assert counters["files|rows_in"] == 12 and counters["write|rows_in"] == 7
    assert counters["write_dead_letters|rows_in"] == 5 and counters["classify/read|rows_out"] == 11
    walls = {d.key.metric.name: d.committed for d in found["distributions"]}
    assert walls["classify/infer|wall_us"].count == counters["classify/infer|batches"] >= 1


def test_a_runner_refuses_an_unknown_primitive_by_name(tmp_path, colour_dir):
    from beamzoo.core.graph import Step
    from beamzoo.core.compile import UnknownPrimitive
    graph = (Graph.source(Files(str(colour_dir / "*.png")))).graph
    odd = Graph((*graph.steps, Step("odd", "window", "nothing", "{}", ("files",))))
    with pytest.raises(UnknownPrimitive, match="EdgeRunner cannot run step 'odd': unknown primitive 'window'"):
        EdgeRunner(progress=False).run(odd)


def test_cancelled_worker_stream_at_job_end_is_not_reported():
    import threading

    import grpc

    from beamzoo.runners.options import quiet_worker_shutdown

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


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, colour_dir, tiny_model):
    from beamzoo.outdir import OutputLocked
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from beamzoo.outdir import lock_output
        with lock_output({str(out)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"pid {holder.pid} on host .* is writing to {out}"):
            run_graph(score_images(str(colour_dir / "*"), str(out), tiny_model, topk=3))
        assert not (out / "predictions").exists()
    finally:
        holder.communicate("")
    stats = run_graph(score_images(str(colour_dir / "*"), str(out), tiny_model, topk=3))  # free again
    assert stats.scored == 6


@pytest.mark.parametrize("name, sibling", [("res?1", "resA1"), ("out*", "outX"), ("outdir[1]", "outdir1")])
def test_output_folders_with_glob_characters(tmp_path, colour_dir, tiny_model, name, sibling):
    real, other = tmp_path / name, tmp_path / sibling
    run_graph(score_images(str(colour_dir / "*"), str(other), tiny_model, topk=3))  # a folder the pattern would match
    (other / "predictions" / ".beamzoo-left.tmp").write_text("a sibling's temporary file")
    graph = score_images(str(colour_dir / "*"), str(real), tiny_model, topk=3)
    first = run_graph(graph)  # the sibling's results do not count as this folder's
    again = run_graph(graph, resume=True)
    assert (first.scored, again.scored, again.skipped) == (6, 0, 6)
    assert count_rows(str(real / "predictions")) == 6 and count_rows(str(other / "predictions")) == 6
    assert (other / "predictions" / ".beamzoo-left.tmp").exists()  # never removed by this folder's resume


def test_resume_removes_only_beamzoos_own_temporaries(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph)
    mine = tmp_path / "predictions" / ".notes.tmp"
    mine.write_text("the user's")
    stale = tmp_path / "predictions" / ".beamzoo-0123abcd.tmp"
    stale.write_text("a killed run's")
    run_graph(graph, resume=True)
    assert mine.exists() and not stale.exists()


def test_edge_channels_are_bounded_in_bytes_as_well_as_batches():
    import threading
    from beamzoo.runners.edge import Channel
    ch = Channel(maxsize=100, producers=1, max_bytes=1 << 20)
    big = pa.record_batch([pa.array([b"x" * (700 << 10)], pa.binary())], names=["data"])
    ch.put((0, big))  # 700 KiB: fits
    second = threading.Thread(target=ch.put, args=((0, big),), daemon=True)
    second.start()
    second.join(0.5)
    assert second.is_alive() and ch.bytes == big.nbytes  # 1.4 MiB would be over the 1 MiB bound: it waits
    item, waited = ch.get()
    assert item[1] is big and waited == 0.0  # it was there: no wait
    second.join(5)
    assert not second.is_alive() and ch.bytes == big.nbytes
    ch.get()
    huge = pa.record_batch([pa.array([b"x" * (3 << 20)], pa.binary())], names=["data"])
    ch.put((0, huge))  # bigger than the bound: an empty channel takes it alone
    assert ch.bytes == huge.nbytes
    with pytest.raises(ValueError, match="EdgeRunner: queue_bytes must be >= 1, got 0"):
        EdgeRunner(queue_bytes=0)

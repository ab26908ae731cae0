"""Resume: a killed run, started again with resume, scores only what is missing."""
from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import cv2
import numpy as np
import pyarrow as pa
import pytest

from beamzoo.core.knobs import KnobError
from beamzoo.transforms import resume
from beamzoo.pipeline import score_images
from beamzoo.transforms.resume import PROCESSING, STAT, Key, StatKey, done_rows
from beamzoo.runners.sinks import count_rows
from beamzoo.transforms.io import list_files
from conftest import COLOURS, ROOT, read, run_graph, tiny_card, tiny_colour_model, write_colour_image


def all_rows(out):
    return read(out) + read(out, "dead_letter")


def outputs(out) -> list[str]:
    return [str(out / "predictions"), str(out / "dead_letter")]


@pytest.mark.parametrize("by, prefix", [("stat", STAT), ("content", "")])
def test_every_row_carries_a_key(tmp_path, colour_dir, tiny_model, by, prefix):
    (colour_dir / "broken.jpg").write_bytes(b"not a jpeg")
    run_graph(score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3), resume_by=by)
    preds, dead = read(tmp_path), read(tmp_path, "dead_letter")
    assert all(len(r["key"]) == len(prefix) + 64 and r["key"].startswith(prefix) for r in preds + dead)
    assert len({r["key"] for r in preds}) == len(preds)


def test_output_dir_with_results_needs_resume(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph)
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_graph(graph)


@pytest.mark.parametrize("by, skipper", [("stat", "stat_key"), ("content", "key")])
def test_resuming_a_finished_run_does_no_inference(tmp_path, colour_dir, tiny_model, runner, by, skipper):
    graph = score_images(str(colour_dir / "**" / "*.*"), str(tmp_path), tiny_model, topk=3)
    first = run_graph(graph, runner, resume_by=by)
    again = run_graph(graph, runner, resume=True, resume_by=by)
    assert first.steps["classify/infer"].rows_in == 9
    assert again.steps[skipper].skipped == 9 and again.steps.get("classify/infer") is None  # not one row reached it
    assert (first.inputs, first.scored, first.failed, first.skipped) == (9, 9, 0, 0)
    assert (again.inputs, again.scored, again.failed, again.skipped) == (9, 0, 0, 9)
    assert again.line() == "inputs: 9  scored: 0  dead letters: 0  already done: 9"


@pytest.mark.parametrize("by", ["stat", "content"])
def test_changed_file_and_new_model_version_are_scored_again(tmp_path, colour_dir, tiny_model, by):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph, resume_by=by)
    before = os.stat(colour_dir / "red0.png").st_mtime_ns
    write_colour_image(colour_dir / "red0.png", (20, 20, 230))  # now blue
    later = before + 10**9 if by == "stat" else before  # by content, even its old time back does not hide it
    os.utime(colour_dir / "red0.png", ns=(later, later))  # (a clock a tick coarser might not have moved)
    stats = run_graph(graph, resume=True, resume_by=by)
    assert (stats.inputs, stats.scored, stats.skipped) == (6, 1, 5)  # this run's inputs, consistently
    rows = read(tmp_path)
    red0 = [r["label"] for r in rows if r["path"].endswith("red0.png")]
    assert sorted(red0) == ["blue", "red"] and len(rows) == 7

    other = tiny_colour_model(tmp_path / "v2.onnx")
    v2 = tiny_card(other, version="2")
    graph2 = score_images(str(colour_dir / "*"), str(tmp_path), v2, topk=3)
    assert graph2.fingerprint(PROCESSING) != graph.fingerprint(PROCESSING)
    run_graph(graph2, resume=True, resume_by=by)
    models = Counter(r["model"] for r in read(tmp_path))
    assert models == {"tiny_colour:1": 7, "tiny_colour:2": 6}


@pytest.mark.parametrize("by", ["stat", "content"])
def test_unreadable_inputs_are_not_retried(tmp_path, colour_dir, tiny_model, by):
    empty = str(colour_dir / "empty.png")
    (colour_dir / "empty.png").write_bytes(b"")
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph, resume_by=by)
    stats = run_graph(graph, resume=True, resume_by=by)
    assert (stats.inputs, stats.scored, stats.failed, stats.skipped) == (7, 0, 0, 7)
    dead = read(tmp_path, "dead_letter")
    assert len(dead) == 1  # not dead-lettered again
    if by == "content":  # it failed before it had a key
        assert done_rows(outputs(tmp_path)).unkeyed == {empty}
    else:  # keyed before it was read: once it holds an image, it is scored
        assert dead[0]["key"].startswith(STAT) and not done_rows(outputs(tmp_path)).unkeyed
        write_colour_image(colour_dir / "empty.png", (230, 20, 20))
        stats = run_graph(graph, resume=True, resume_by=by)
        assert (stats.scored, stats.skipped) == (1, 6)
        assert [r["label"] for r in read(tmp_path) if r["id"] == empty] == ["red"]


def test_committed_outputs_are_read_once_per_state_of_the_folder(tmp_path, colour_dir, tiny_model, monkeypatch):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph)
    reads = Counter()
    real = resume.pq.read_table
    monkeypatch.setattr(resume.pq, "read_table", lambda f, **kw: reads.update([f]) or real(f, **kw))
    stats = run_graph(graph, resume=True)  # the skip step and the key step both ask, in two threads each
    assert (stats.inputs, stats.skipped) == (6, 6)
    assert reads and max(reads.values()) == 1  # nothing new was scored: the folder did not change
    first = sorted((tmp_path / "predictions").glob("part-*.parquet"))[0]
    shutil.copy(first, tmp_path / "predictions" / "part-copy-00000.parquet")
    done_rows(outputs(tmp_path))  # the folder changed: read again
    assert reads[str(tmp_path / "predictions" / "part-copy-00000.parquet")] == 1


def test_a_corrupt_output_file_stops_resume_with_the_way_forward(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph)
    bad = tmp_path / "predictions" / "part-foreign.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(resume.CorruptOutput, match=r"part-foreign.parquet cannot be read .*mv .*\.bad"):
        run_graph(graph, resume=True)
    os.replace(bad, str(bad) + ".bad")
    assert run_graph(graph, resume=True).skipped == 6


READ = "classify/read"  # the step that reads each input's bytes


def rows_in(stats, step: str) -> int:
    """The rows a step saw (a step that saw none has no metrics)."""
    return stats.steps[step].rows_in if step in stats.steps else 0


def same_stat_other_bytes(path: str) -> None:
    """Other bytes of the same size, and the file's times given back: a stat sees what it saw
    before, a read sees no image."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_resume_by_stat_skips_done_inputs_without_reading_them(tmp_path, colour_dir, tiny_model, runner):
    pattern = str(colour_dir / "**" / "*.*")
    graph = score_images(pattern, str(tmp_path), tiny_model, topk=3)
    assert run_graph(graph, runner).steps[READ].rows_in == 9
    for path in list_files(pattern):
        same_stat_other_bytes(path)  # had it been read, it would be a dead letter now
    again = run_graph(graph, runner, resume=True)
    assert (again.inputs, again.scored, again.failed, again.skipped) == (9, 0, 0, 9)
    assert again.steps["stat_key"].skipped == 9 and rows_in(again, READ) == 0 and rows_in(again, "key") == 0


@pytest.mark.parametrize("by, scored", [("stat", 1), ("content", 0)])
def test_a_touched_file_is_scored_again_by_stat_not_by_content(tmp_path, colour_dir, tiny_model, by, scored):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph, resume_by=by)
    touched = colour_dir / "green1.jpg"
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new time, the same bytes
    stats = run_graph(graph, resume=True, resume_by=by)
    assert (stats.inputs, stats.scored, stats.skipped) == (6, scored, 6 - scored)
    assert rows_in(stats, READ) == (1 if by == "stat" else 6)  # by content every input is read


def test_outputs_keyed_by_content_are_checked_by_content_on_a_resume_by_stat(tmp_path, colour_dir, tiny_model,
                                                                              runner):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph, runner, resume_by="content")
    before = os.stat(colour_dir / "red0.png").st_mtime_ns
    write_colour_image(colour_dir / "red0.png", (20, 20, 230))  # now blue
    os.utime(colour_dir / "red0.png", ns=(before + 10**9, before + 10**9))
    stats = run_graph(graph, runner, resume=True)  # by stat: no stat key is done yet
    assert (stats.inputs, stats.scored, stats.skipped) == (6, 1, 5)
    assert rows_in(stats, READ) == 6 and stats.steps["key"].skipped == 5  # read to be checked, not scored again
    assert sorted(r["label"] for r in read(tmp_path) if r["id"].endswith("red0.png")) == ["blue", "red"]
    mixed = run_graph(graph, runner, resume=True)  # red0 is done by stat now, the rest by content
    assert (mixed.scored, mixed.skipped, mixed.steps["stat_key"].skipped, rows_in(mixed, READ)) == (0, 6, 1, 5)


def test_outputs_keyed_by_stat_are_scored_again_on_a_resume_by_content(tmp_path, colour_dir, tiny_model, runner):
    graph = score_images(str(colour_dir / "*"), str(tmp_path), tiny_model, topk=3)
    run_graph(graph, runner)
    stats = run_graph(graph, runner, resume=True, resume_by="content")
    assert (stats.inputs, stats.scored, stats.skipped) == (6, 6, 0)  # a key of the other kind is never "done"
    assert set(Counter(r["id"] for r in read(tmp_path)).values()) == {2}


def test_objects_are_keyed_by_what_their_store_says(tmp_path, colour_dir, tiny_model):
    import fsspec
    fs = fsspec.filesystem("memory")
    for path in sorted(colour_dir.glob("*.png")):
        fs.pipe(f"/resume_by_stat/{path.name}", path.read_bytes())
    try:
        graph = score_images("memory://resume_by_stat/*.png", str(tmp_path), tiny_model, topk=3)
        run_graph(graph)
        assert all(r["key"].startswith(STAT) for r in read(tmp_path))
        again = run_graph(graph, resume=True)
        assert (again.inputs, again.skipped, rows_in(again, READ)) == (3, 3, 0)
        fs.pipe("/resume_by_stat/red0.png", (colour_dir / "blue2.png").read_bytes())  # a new object
        changed = run_graph(graph, resume=True)
        assert (changed.scored, changed.skipped, rows_in(changed, READ)) == (1, 2, 1)
    finally:
        fs.rm("/resume_by_stat", recursive=True)


def test_an_input_with_nothing_to_stat_is_keyed_by_its_content():
    from beamzoo.core.schemas import ID, PATH
    url = "https://example.invalid/a.jpg"
    batch = pa.record_batch([pa.array(["u"]), pa.array([url])], schema=pa.schema([ID, PATH]))
    stat = StatKey("v1", None).process(batch).ok
    assert stat.column("key").to_pylist() == [None]  # no request is made for a URL's metadata
    keyed = Key("v1", None).process(stat.append_column("data", pa.array([b"abc"], pa.binary()))).ok
    assert keyed.column("key").to_pylist() == [Key("v1", None).key(b"abc")] and keyed.schema.names[-1] == "key"


@pytest.mark.parametrize("command", ["score_images", "ocr_images"])
def test_both_commands_take_resume_by(command, capsys):
    spec = importlib.util.spec_from_file_location(command, os.path.join(ROOT, "pipelines", f"{command}.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args, _ = cli.parser().parse_known_args(["--input", "x", "--output", "o", "--resume", "--resume_by", "content"])
    assert args.resume_by == "content"
    with pytest.raises(SystemExit) as exc:
        cli.parser().parse_known_args(["--input", "x", "--output", "o", "--resume_by", "mtime"])
    assert exc.value.code == 2 and "--resume_by" in capsys.readouterr().err


def test_run_refuses_an_unknown_resume_by(tmp_path, colour_dir, tiny_model):
    with pytest.raises(KnobError, match="resume_by must be one of stat, content"):
        run_graph(score_images(str(colour_dir / "*"), str(tmp_path), tiny_model), resume_by="mtime")


KILLABLE = textwrap.dedent("""
    import sys
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners.edge import EdgeRunner
    from conftest import tiny_card
    pattern, out, runner, model = sys.argv[1:5]
    graph = score_images(pattern, out, tiny_card(model), topk=3, batch_size=8)
    edge = EdgeRunner(workers=2, chunk_size=4, progress=False, rows_per_file=10, seconds_per_file=0.05)
    stats = run(graph, runner, ["--direct_num_workers=1"], edge=edge, resume=True)
    print(stats.line())
""")


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """400 noisy colour photos-to-be (JPEG, 480x360) and two broken files."""
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(7)
    for i in range(400):
        img = rng.integers(0, 60, (360, 480, 3), dtype=np.uint8)
        img[..., 2 - i % 3] += 180  # BGR: red, green, blue in turn
        cv2.imwrite(str(d / f"{COLOURS[i % 3]}{i:04d}.jpg"), img)
    (d / "broken0001.jpg").write_bytes(b"\xff\xd8 not really")
    (d / "empty0002.png").write_bytes(b"")
    return d


def committed(out) -> int:
    out = os.path.join(out, "predictions")
    return len([f for f in os.listdir(out) if f.endswith(".parquet")]) if os.path.isdir(out) else 0


def kill_mid_run(cmd, env, out, rng, beam: bool) -> bool:
    """Start a run and SIGKILL it at a random moment while it works; True if killed."""
    before = committed(out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    def started() -> bool:  # Beam commits at the end; its temporary folder shows it is writing
        if beam:
            sub = os.path.join(out, "predictions")
            return os.path.isdir(sub) and any(f.startswith("beam-temp") for f in os.listdir(sub))
        return committed(out) > before

    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.1))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return killed


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["EdgeRunner", "DirectRunner"])
def test_killed_runs_resume_to_exactly_once(tmp_path, many_images, runner):
    model = tiny_colour_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", KILLABLE, str(many_images / "*"), str(out), runner, str(model)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    rng = random.Random(runner)
    kills = sum(kill_mid_run(cmd, env, out, rng, runner != "EdgeRunner") for _ in range(3))
    assert kills >= 2, "runs ended before they were killed: the test no longer tests resume"
    if runner == "EdgeRunner":
        assert 0 < count_rows(str(out / "predictions")) < 400  # the killed runs kept their commits
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    inputs = list_files(str(many_images / "*"))
    counts = dict(zip(("inputs", "scored", "dead"), map(int, re.findall(r"\d+", final.stdout.splitlines()[-1])[:3])))
    done = re.search(r"already done: (\d+)", final.stdout)
    assert counts["inputs"] == len(inputs) == 402
    assert counts["scored"] + counts["dead"] + (int(done.group(1)) if done else 0) == 402
    ids = Counter(r["id"] for r in all_rows(out))
    assert set(ids) == set(inputs) and set(ids.values()) == {1}
    assert (len(read(out)), len(read(out, "dead_letter"))) == (400, 2)
    leftovers = [f for sub in ("predictions", "dead_letter") for f in os.listdir(out / sub)
                 if f.startswith((".", "beam-temp"))]
    assert leftovers == []

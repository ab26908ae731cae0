"""Resume: a killed run, started again with resume, scores only what is missing."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import cv2
import numpy as np
import pytest

from beamzoo.pipeline import run, score_images
from beamzoo import resume
from beamzoo.resume import done_rows, graph_version
from beamzoo.runners import EdgeRunner
from beamzoo.runners.sinks import count_rows
from beamzoo.transforms.io import list_files
from conftest import COLOURS, tiny_card, tiny_colour_model, write_colour_image
from test_runners import ROOT, read

EDGE = dict(runner="EdgeRunner", edge=EdgeRunner(workers=2, progress=False))


def all_rows(out):
    return read(str(out), "predictions") + read(str(out), "dead_letter")


def test_every_row_carries_a_key(tmp_path, colour_dir, tiny_model):
    (colour_dir / "broken.jpg").write_bytes(b"not a jpeg")
    run(score_images(str(colour_dir / "*"), tiny_model, k=3), str(tmp_path), **EDGE)
    preds, dead = read(str(tmp_path), "predictions"), read(str(tmp_path), "dead_letter")
    assert all(len(r["key"]) == 64 for r in preds + dead)
    assert len({r["key"] for r in preds}) == len(preds)


def test_output_dir_with_results_needs_resume(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "*"), tiny_model, k=3)
    run(graph, str(tmp_path), **EDGE)
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(graph, str(tmp_path), **EDGE)


@pytest.mark.parametrize("runner", ["EdgeRunner", "DirectRunner"])
def test_resuming_a_finished_run_does_no_inference(tmp_path, colour_dir, tiny_model, runner):
    graph = score_images(str(colour_dir / "**" / "*.*"), tiny_model, k=3)
    first = run(graph, str(tmp_path), runner, edge=EdgeRunner(progress=False))
    calls = []
    infer = graph.steps[-2]
    original = infer.run
    infer.run = lambda x: calls.append(len(x)) or original(x)
    again = run(graph, str(tmp_path), "EdgeRunner", edge=EdgeRunner(progress=False), resume=True)
    assert calls == []
    assert (again.inputs, again.scored, again.failed) == (first.inputs, first.scored, first.failed) == (9, 9, 0)


def test_changed_file_and_new_model_version_are_scored_again(tmp_path, colour_dir, tiny_model):
    graph = score_images(str(colour_dir / "*"), tiny_model, k=3)
    run(graph, str(tmp_path), **EDGE)
    write_colour_image(colour_dir / "red0.png", (20, 20, 230))  # now blue
    run(graph, str(tmp_path), **EDGE, resume=True)
    rows = read(str(tmp_path), "predictions")
    red0 = [r["label"] for r in rows if r["path"].endswith("red0.png")]
    assert sorted(red0) == ["blue", "red"] and len(rows) == 7

    other = tiny_colour_model(tmp_path / "v2.onnx")
    v2 = tiny_card(other, version="2")
    graph2 = score_images(str(colour_dir / "*"), v2, k=3)
    assert graph_version(graph2) != graph_version(graph)
    run(graph2, str(tmp_path), **EDGE, resume=True)
    models = Counter(r["model"] for r in read(str(tmp_path), "predictions"))
    assert models == {"tiny_colour:1": 7, "tiny_colour:2": 6}


def test_unreadable_inputs_are_not_retried(tmp_path, colour_dir, tiny_model):
    (colour_dir / "empty.png").write_bytes(b"")
    graph = score_images(str(colour_dir / "*"), tiny_model, k=3)
    run(graph, str(tmp_path), **EDGE)
    stats = run(graph, str(tmp_path), **EDGE, resume=True)
    assert (stats.inputs, stats.scored, stats.failed) == (7, 6, 1)
    assert done_rows(str(tmp_path))[1] == {str(colour_dir / "empty.png")}


def test_committed_outputs_are_read_once_per_state_of_the_folder(tmp_path, colour_dir, tiny_model, monkeypatch):
    graph = score_images(str(colour_dir / "*"), tiny_model, k=3)
    run(graph, str(tmp_path), **EDGE)
    reads = Counter()
    real = resume.pq.read_table
    monkeypatch.setattr(resume.pq, "read_table", lambda f, **kw: reads.update([f]) or real(f, **kw))
    stats = run(graph, str(tmp_path), **EDGE, resume=True)  # select() and the Key step both ask
    assert (stats.inputs, stats.scored, stats.failed) == (6, 6, 0)
    assert reads and max(reads.values()) == 1  # nothing new was scored: the folder did not change
    first = sorted(tmp_path.glob("predictions-*.parquet"))[0]
    shutil.copy(first, tmp_path / "predictions-copy-00000.parquet")
    done_rows(str(tmp_path))  # the folder changed: read again
    assert reads[str(tmp_path / "predictions-copy-00000.parquet")] == 1


KILLABLE = textwrap.dedent("""
    import sys
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners import EdgeRunner
    from conftest import tiny_card
    pattern, out, runner, model = sys.argv[1:5]
    graph = score_images(pattern, tiny_card(model), k=3, batch_size=8)
    edge = EdgeRunner(workers=2, chunk_size=4, progress=False, rows_per_file=10, seconds_per_file=0.05)
    stats = run(graph, out, runner, ["--direct_num_workers=1"], edge=edge, resume=True)
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
    return len([f for f in os.listdir(out) if f.endswith(".parquet")]) if os.path.isdir(out) else 0


def kill_mid_run(cmd, env, out, rng, beam: bool) -> bool:
    """Start a run and SIGKILL it at a random moment while it works; True if killed."""
    before = committed(out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    def started() -> bool:  # Beam commits at the end; its temporary folder shows it is writing
        if beam:
            return os.path.isdir(out) and any(f.startswith("beam-temp") for f in os.listdir(out))
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
        assert 0 < count_rows(str(out), "predictions") < 400  # the killed runs kept their commits
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    inputs = list_files(str(many_images / "*"))
    assert f"inputs: {len(inputs)}  scored: 400  dead letters: 2" in final.stdout
    paths = Counter(r["path"] for r in all_rows(out))
    assert set(paths) == set(inputs) and set(paths.values()) == {1}
    assert [f for f in os.listdir(out) if f.startswith((".", "beam-temp"))] == []

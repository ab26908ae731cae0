"""model_refresh: a long-running pipeline moves to the newest verified version of its model's name."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beamzoo.classify import Classify
from beamzoo.core.context import Hooks, RunContext
from beamzoo.core.knobs import KnobError
from beamzoo.pipeline import Pipeline, run
from beamzoo.runners.edge import EdgeRunner
from beamzoo.runners.inline import Engine, InlineRunner
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.serving import Responses
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files
from beamzoo.zoo import get
from conftest import ROOT, error_line, paths_batch, read, tiny_colour_model, write_colour_image
from test_cli import parse
from test_zoo import write_card

RGB = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
INFER = "classify/infer"


@pytest.fixture(autouse=True)
def zoo_of_this_test(tmp_path, monkeypatch):
    """A users' repository of tiny_colour, and no other one."""
    repo = tmp_path / "zoo"
    repo.mkdir()
    monkeypatch.setattr("beamzoo.zoo.repository._extra", [])
    monkeypatch.setenv("BEAMZOO_ZOO", str(repo))
    return repo


def swapped_colour_model(path):
    """tiny_colour_model with the red and green logits swapped: a red image is called green."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    weights = [numpy_helper.from_array(np.array(10.0, np.float32), "scale"),
               numpy_helper.from_array(np.array([1, 0, 2], np.int64), "order")]
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Mul", ["m", "scale"], ["s"]),
             helper.make_node("Gather", ["s", "order"], ["logits"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "swapped", [x], [y], weights),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def publish(repo, version: str, swapped: bool = False, size: int = 32, **changes) -> str:
    """Version ``version`` of tiny_colour in ``repo`` (``changes``: card fields)."""
    d = repo / "tiny_colour" / version
    d.mkdir(parents=True)
    model = swapped_colour_model(d / "tiny.onnx") if swapped else tiny_colour_model(d / "tiny.onnx", size=size)
    write_card(d, model, version=version, **changes)
    return f"tiny_colour:{version}"


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    return {c: write_colour_image(d / f"{c}.png", rgb) for c, rgb in RGB.items()}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def engine(model, clock, **knobs):
    """The in-thread engine of files -> Classify -> rows in memory, in a run whose clock is ``clock``."""
    p = Pipeline()
    p | Files("unused/*.png") | Classify(model, topk=1, **knobs) | Responses()
    ctx = RunContext(clock=clock)
    return Engine(InlineRunner().compile(p.graph), ctx), ctx


def answers(eng, paths) -> dict[str, tuple[str, str, float]]:
    """(label, model, score) of each image, by colour."""
    rows = eng.run(paths_batch(list(paths.values()))).by_id("responses", ["path", "label", "model", "score"])
    by_path = {r["path"]: (r["label"], r["model"], round(r["score"], 4)) for r in rows.values()}
    return {c: by_path[p] for c, p in paths.items()}


def models(got) -> set[str]:
    return {m for _, m, _ in got.values()}


# ---- the in-thread engine, batch by batch -------------------------------------------------------

def test_a_newer_version_answers_from_the_next_batch_once_the_clock_says_so(zoo_of_this_test, images, capsys):
    repo, clock = zoo_of_this_test, Clock()
    publish(repo, "1")
    eng, ctx = engine("tiny_colour", clock, model_refresh=10)
    first = answers(eng, images)
    assert models(first) == {"tiny_colour:1"} and first["red"][0] == "red" and first["green"][0] == "green"

    publish(repo, "2", swapped=True)
    assert models(answers(eng, images)) == {"tiny_colour:1"}  # not 10 seconds yet
    clock.t += 10
    second = answers(eng, images)
    assert models(second) == {"tiny_colour:2"}
    assert (second["red"][0], second["green"][0], second["blue"][0]) == ("green", "red", "blue")  # v2's weights
    assert second["red"][2] == first["green"][2]  # the same scores, for the other class
    assert "model_refresh: step 'classify/infer' answers with tiny_colour:2 from now on (was tiny_colour:1)" \
        in capsys.readouterr().err
    assert ctx.notes[INFER]["models"] == ["tiny_colour:1", "tiny_colour:2"]


def test_a_card_that_does_not_verify_or_does_not_fit_is_refused_once_and_the_running_version_keeps_going(
        zoo_of_this_test, images, capsys):
    repo, clock = zoo_of_this_test, Clock()
    publish(repo, "2", swapped=True)
    eng, ctx = engine("tiny_colour", clock, model_refresh=0)  # before every batch
    assert models(answers(eng, images)) == {"tiny_colour:2"}

    publish(repo, "3", sha256="0" * 64)
    assert models(answers(eng, images)) == {"tiny_colour:2"}
    assert models(answers(eng, images)) == {"tiny_colour:2"}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("model_refresh: step 'classify/infer': tiny_colour:3 does not verify:")
    assert "sha256" in err[0] and err[0].endswith("; keeping tiny_colour:2")

    publish(repo, "4", labels=["cyan", "magenta", "yellow"])
    got = answers(eng, images)
    assert models(got) == {"tiny_colour:2"} and got["red"][0] == "green"
    assert capsys.readouterr().err.splitlines() == [
        "model_refresh: step 'classify/infer': tiny_colour:4 has other labels than tiny_colour:2; "
        "keeping tiny_colour:2"]

    publish(repo, "5", size=16, preprocess=dict(resize=18, crop=16),
            inputs=[dict(name="images", dtype="float32", shape=[3, 16, 16], layout="NCHW", channels="RGB",
                         value_range=[-1, 1])])
    assert models(answers(eng, images)) == {"tiny_colour:2"}
    assert "tiny_colour:5 has other inputs (images float32[3, 16, 16]) than tiny_colour:2 (images float32[3, 32, 32])" \
        in capsys.readouterr().err
    assert set(ctx.notes[INFER]["refused"]) == {"tiny_colour:3", "tiny_colour:4", "tiny_colour:5"}

    publish(repo, "6")  # a good version after refused ones still answers
    got = answers(eng, images)
    assert models(got) == {"tiny_colour:6"} and got["red"][0] == "red"
    assert ctx.notes[INFER]["models"] == ["tiny_colour:2", "tiny_colour:6"]


def test_refresh_off_a_new_version_changes_nothing(zoo_of_this_test, images, capsys):
    repo, clock = zoo_of_this_test, Clock()
    publish(repo, "1")
    eng, ctx = engine("tiny_colour", clock)
    publish(repo, "2", swapped=True)
    clock.t += 3600
    got = answers(eng, images)
    assert models(got) == {"tiny_colour:1"} and got["red"][0] == "red"
    assert capsys.readouterr().err == "" and "models" not in ctx.notes.get(INFER, {})


def test_refresh_off_keeps_the_graph_its_schema_and_its_fingerprint(zoo_of_this_test):
    card = get(publish(zoo_of_this_test, "1"))

    def graph(**knobs):
        p = Pipeline()
        p | Files("x/*.png") | Classify(card, **knobs) | WriteParquet("out")
        return p.graph
    off, on = graph(), graph(model_refresh=5)
    assert "model_refresh" not in OnnxInference(card).result_params()
    assert "model_field" not in TopK(card).result_params()
    assert off.fingerprint() != on.fingerprint()
    infer = OnnxInference(card, model_refresh=5)
    assert "answered_by" in infer.produces.names and "answered_by" not in OnnxInference(card).produces.names
    assert off.schema("classify/topk") == on.schema("classify/topk")  # TopK turns answered_by into model
    assert "answered_by" in on.schema("classify/infer").names


def test_following_a_name_the_graph_version_outlives_a_move_so_a_resume_skips_what_any_version_answered(
        zoo_of_this_test, images, tmp_path):
    repo = zoo_of_this_test
    publish(repo, "1")
    out = tmp_path / "out"

    def graph(**knobs):
        p = Pipeline()
        p | Files(os.path.join(os.path.dirname(images["red"]), "*.png")) | Classify("tiny_colour", topk=1, **knobs) \
            | WriteParquet(out / "predictions")
        return p.graph
    first, pinned_v1 = graph(model_refresh=0), graph()
    run(first, "EdgeRunner", edge=EdgeRunner(workers=1, progress=False))
    publish(repo, "2", swapped=True)
    assert graph(model_refresh=0).fingerprint() == first.fingerprint()  # built with v2 now: the same version
    assert graph(model_refresh=60).fingerprint() == first.fingerprint()  # whatever the interval
    assert graph().fingerprint() != pinned_v1.fingerprint()  # off, a new model is a new graph version
    again = run(graph(model_refresh=0), "EdgeRunner", edge=EdgeRunner(workers=1, progress=False), resume=True)
    assert (again.inputs, again.skipped, again.scored) == (3, 3, 0)
    assert {r["model"] for r in read(out)} == {"tiny_colour:1"} and len(read(out)) == 3


# ---- the edge runner ---------------------------------------------------------------------------

class PublishAfterFirstBatch(Hooks):
    def __init__(self, repo):
        self.repo, self.done = repo, False

    def batch_done(self, ctx, step, kind, sample):
        if step == INFER and not self.done:
            self.done = True
            publish(self.repo, "2", swapped=True)


def test_the_edge_runner_moves_between_batches_each_row_saying_which_version_answered(
        zoo_of_this_test, images, tmp_path):
    publish(zoo_of_this_test, "1")
    p = Pipeline()
    p | Files(os.path.join(os.path.dirname(images["red"]), "*.png")) | Classify("tiny_colour", topk=1,
                                                                                  model_refresh=0) \
        | WriteParquet(tmp_path / "out" / "predictions")
    hook = PublishAfterFirstBatch(zoo_of_this_test)
    stats = run(p.graph, "EdgeRunner", edge=EdgeRunner(workers=1, chunk_size=1, progress=False), hooks=[hook])
    rows = sorted(read(tmp_path / "out"), key=lambda r: r["path"])  # blue, green, red: listed in that order
    assert [(os.path.basename(r["path"]), r["label"], r["model"]) for r in rows] == [
        ("blue.png", "blue", "tiny_colour:1"), ("green.png", "red", "tiny_colour:2"),
        ("red.png", "green", "tiny_colour:2")]
    assert stats.notes[INFER]["models"] == ["tiny_colour:1", "tiny_colour:2"]


def test_a_beam_runner_refuses_model_refresh_in_one_line(zoo_of_this_test, tmp_path):
    publish(zoo_of_this_test, "1")
    p = Pipeline()
    p | Files(str(tmp_path / "*.png")) | Classify("tiny_colour", model_refresh=5) | WriteParquet(tmp_path / "o")
    with pytest.raises(KnobError, match=r"^step 'classify/infer': model_refresh needs a runner that keeps the "
                                        r"graph in one long-lived process \(EdgeRunner\); DirectRunner runs it "
                                        r"through Beam$"):
        run(p.graph, "direct")


def test_a_bundle_refuses_a_step_that_follows_its_model(zoo_of_this_test, tmp_path):
    from beamzoo.bundle import BundleError, export
    publish(zoo_of_this_test, "1")
    p = Pipeline()
    p | Files(str(tmp_path / "*.png")) | Classify("tiny_colour", model_refresh=5) | WriteParquet(tmp_path / "o")
    with pytest.raises(BundleError, match=r"^step 'classify/infer' follows its model's newest version"):
        export(p.graph, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists() or not any((tmp_path / "bundle").iterdir())


# ---- the command line --------------------------------------------------------------------------

DRIVER = """
import importlib.util, shutil, sys
spec = importlib.util.spec_from_file_location("score_images", "pipelines/score_images.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
real = m.run_command
def run_command(*a, **kw):  # the graph is built with version 1; version 2 appears as the run starts
    shutil.copytree(sys.argv[1], sys.argv[2])
    return real(*a, **kw)
m.run_command = run_command
sys.exit(m.main(sys.argv[3:]))
"""


def test_score_images_with_model_refresh_on_the_edge_runner(zoo_of_this_test, images, tmp_path):
    publish(zoo_of_this_test, "1")
    staged = tmp_path / "staged"
    publish(staged, "2", swapped=True)
    with open(os.path.join(os.path.dirname(images["red"]), "broken.png"), "wb") as f:
        f.write(b"not a png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", DRIVER, str(staged / "tiny_colour" / "2"), str(zoo_of_this_test / "tiny_colour" / "2"),
           "--input", os.path.join(os.path.dirname(images["red"]), "*.png"), "--output", str(out),
           "--runner", "EdgeRunner", "--model", "tiny_colour", "--model_refresh", "0", "--topk", "1",
           "--no_progress", "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inputs: 4  scored: 3  dead letters: 1" in done.stdout
    assert "model_refresh: step 'classify/infer' answers with tiny_colour:2 from now on (was tiny_colour:1)" \
        in done.stderr
    rows = read(out)
    assert len(rows) + len(read(out, "dead_letter")) == 4
    assert {r["model"] for r in rows} == {"tiny_colour:2"}  # every batch looked first; v2 was there
    assert {os.path.basename(r["path"]): r["label"] for r in rows} == {
        "red.png": "green", "green.png": "red", "blue.png": "blue"}


@pytest.mark.parametrize("argv, message", [
    (["--model", "efficientnet_lite0:1", "--runner", "edge"],
     "--model_refresh: --model efficientnet_lite0:1 pins version 1, so there is nothing to move to; "
     "name it as --model efficientnet_lite0"),
    (["--runner", "DirectRunner"],
     "--model_refresh: it needs a runner that keeps the graph in one long-lived process (--runner EdgeRunner); "
     "DirectRunner runs it through Beam"),
    ([], "DirectRunner runs it through Beam"),  # the default runner
    (["--runner", "edge", "--escalate", "efficientnet_lite0"], "a cascade's models stay the versions it was built"),
    (["--runner", "edge", "--select", "task=image-classification"], "--select picks one card"),
])
def test_score_images_refuses_model_refresh_where_it_cannot_follow_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse()(["--output", "/tmp/never", "--model_refresh", "5", *argv])
    assert exit_.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert message in line, line


def test_score_images_refuses_model_refresh_with_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse()(["--export", str(tmp_path / "b"), "--runner", "edge", "--model_refresh", "5"])
    assert exit_.value.code == 2
    assert "a bundle runs the models it carries" in error_line(capsys.readouterr().err)


def test_a_graph_made_before_the_knobs_existed_loads_with_its_fingerprint():
    import json

    from beamzoo.core.graph import Graph
    from test_graph import golden_cascade_graph
    graph = golden_cascade_graph()
    data = json.loads(graph.to_json())
    for s in data["steps"]:
        if s["op"] in ("onnx_infer", "topk"):
            assert s["params"].pop("model_refresh" if s["op"] == "onnx_infer" else "model_field", 0) is None
    old = Graph.from_json(json.dumps(data))
    assert old.fingerprint() == graph.fingerprint()
    assert old.schema("cascade/answers") == graph.schema("cascade/answers")

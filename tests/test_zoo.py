"""The model zoo: cards as data, pins that hold, versions, repositories, selectors, users' own models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from beamzoo import zoo
from beamzoo.pipeline import Pipeline
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files
from beamzoo.zoo.repository import BUILTIN
from conftest import COLOURS, ROOT, read, run_graph, tiny_colour_model


def write_card(folder, model_file, **changes) -> str:
    """A card file for ``tiny_colour_model`` in ``folder`` (YAML, or JSON when ``as_json``)."""
    as_json = changes.pop("as_json", False)
    card = dict(name="tiny_colour", version="1", task="image-classification", file=os.path.basename(model_file),
                sha256=zoo.sha256_of(model_file),
                inputs=[dict(name="images", dtype="float32", shape=[3, 32, 32], layout="NCHW", channels="RGB",
                             value_range=[-1, 1])],
                outputs=[dict(name="logits", dtype="float32", shape=[3])],
                labels="labels.txt", preprocess=dict(resize=36, crop=32), tags=["colour"],
                metrics=dict(colour_top1=dict(value=0.99, source="tests/test_zoo.py, solid colours")))
    for k, v in changes.items():
        if v is None:
            card.pop(k, None)
        else:
            card[k] = v
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.write("\n".join(COLOURS) + "\n")
    path = os.path.join(folder, "card.json" if as_json else "card.yaml")
    with open(path, "w") as f:
        (json.dump if as_json else yaml.safe_dump)(card, f)
    return path


@pytest.fixture
def user_card(tmp_path):
    (tmp_path / "card").mkdir()
    return write_card(tmp_path / "card", tiny_colour_model(tmp_path / "card" / "tiny.onnx"))


@pytest.fixture(autouse=True)
def no_extra_repositories(monkeypatch):
    monkeypatch.delenv("BEAMZOO_ZOO", raising=False)
    monkeypatch.setattr("beamzoo.zoo.repository._extra", [])


# ---- cards -------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_json", [False, True])
def test_a_card_file_loads_with_every_field(tmp_path, as_json):
    (tmp_path / "c").mkdir()
    path = write_card(tmp_path / "c", tiny_colour_model(tmp_path / "c" / "tiny.onnx"), as_json=as_json)
    card = zoo.load_card(path)
    assert card.ref == "tiny_colour:1" and card.task == "image-classification"
    assert card.labels == COLOURS and card.tags == ("colour",) and card.preprocess == {"resize": 36, "crop": 32}
    assert [t.name for t in card.inputs] == ["images"] and card.inputs[0].shape == (3, 32, 32)
    assert card.input.channels == "RGB" and card.input.value_range == (-1.0, 1.0)
    assert card.metric("colour_top1") == 0.99 and card.file == str(tmp_path / "c" / "tiny.onnx")
    assert zoo.card_of(card.as_dict()) == card  # a graph holds it as data


def _other_model(folder):
    return tiny_colour_model(folder / "other.onnx", size=16)


@pytest.mark.parametrize("changes, field, message", [
    (dict(task=None), "task", "is required"),
    (dict(version=[1]), "version", "must be a string"),
    (dict(inputs="images"), "inputs", "must be a list of one or more"),
    (dict(inputs=[dict(name="images", dtype="float32", shape=[3, -1, 32])]), "inputs[0].shape",
     "positive sizes or null"),
    (dict(file="missing.onnx"), "file", "does not exist"),
    (dict(sha256="0" * 64), "sha256", "pins 0000"),
    (dict(labels=["red", "green"]), "labels", "has 2 labels, but output 'logits' has 3 classes"),
    (dict(outputs=[dict(name="scores", dtype="float32", shape=[3])]), "outputs[0].name",
     "'scores' is not in the model; its outputs: 'logits'"),
    (dict(inputs=[dict(name="images", dtype="float32", shape=[3, 64, 64], layout="NCHW", channels="RGB",
                       value_range=[-1, 1])], preprocess=None), "inputs[0].shape", "'images' is ['batch', 3, 32, 32]"),
    (dict(build={"builder": "efficientnet_lite"}), "build", "only beamzoo's built-in cards are built"),
    (dict(colour="red"), "colour", "is not a card field"),
    (dict(metrics={"top1": 0.9}), "metrics.top1", "source: where the figure comes from"),
    (dict(preprocess={"crop": 30}), "preprocess.crop", "is 30, but input 'images' takes 32"),
])
def test_a_bad_card_is_refused_when_loaded_naming_the_file_and_field(tmp_path, changes, field, message):
    (tmp_path / "c").mkdir()
    path = write_card(tmp_path / "c", tiny_colour_model(tmp_path / "c" / "tiny.onnx"), **changes)
    with pytest.raises((zoo.CardError, zoo.ModelIntegrityError)) as err:
        zoo.load_card(path)
    text = str(err.value)
    assert path in text and message in text
    assert f"field {field!r}" in text


def test_not_yaml_and_not_a_mapping_are_refused(tmp_path):
    bad = tmp_path / "card.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(zoo.CardError, match="is not valid YAML"):
        zoo.load_card(bad)
    bad.write_text("- a list\n")
    with pytest.raises(zoo.CardError, match="must be a mapping of fields"):
        zoo.load_card(bad)


# ---- pins --------------------------------------------------------------------------------------

def test_a_built_in_model_is_pinned_by_the_package_not_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAMZOO_CACHE", str(tmp_path / "cache"))
    card = zoo.load_card(BUILTIN / "efficientnet_lite0" / "1" / "card.yaml", builtin=True)
    assert card.file.startswith(str(tmp_path / "cache"))
    fake = tiny_colour_model(tmp_path / "evil.onnx")
    os.makedirs(os.path.dirname(card.file))
    shutil.copyfile(fake, card.file)
    with open(card.file + ".sha256", "w") as f:  # a pin file beside it changes nothing
        f.write(zoo.sha256_of(fake))
    with pytest.raises(zoo.ModelIntegrityError, match="field 'sha256'\\) pins 7814960e"):
        zoo.model_bytes(card)


def test_the_session_is_made_from_the_bytes_that_were_checked(tmp_path, user_card, monkeypatch):
    card = zoo.load_card(user_card)
    seen = []
    import onnxruntime
    real = onnxruntime.InferenceSession

    def spy(model, *a, **kw):
        seen.append(model)
        return real(model, *a, **kw)
    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    OnnxInference(card).setup()
    with open(card.file, "rb") as f:
        assert seen == [f.read()]  # bytes, not a path opened again


# ---- versions and repositories -----------------------------------------------------------------

@pytest.fixture
def repo(tmp_path):
    """A users' repository with versions 1, 2 and 10 of one model."""
    r = tmp_path / "repo"
    for v in ("1", "2", "10"):
        d = r / "tiny_colour" / v
        d.mkdir(parents=True)
        write_card(d, tiny_colour_model(d / "tiny.onnx"), version=v)
    return r


def test_name_means_the_newest_version_and_name_version_exactly_that(repo, monkeypatch):
    monkeypatch.setenv("BEAMZOO_ZOO", str(repo))
    assert zoo.get("tiny_colour").version == "10"
    assert zoo.get("tiny_colour:2").version == "2"
    assert zoo.versions("tiny_colour") == ["1", "2", "10"]
    with pytest.raises(zoo.UnknownModel, match="has no version '3'; its versions: 1, 2, 10"):
        zoo.get("tiny_colour:3")
    with pytest.raises(zoo.UnknownModel, match="has no version '2'; its versions: 1"):
        zoo.get("efficientnet_lite0:2")
    assert "efficientnet_lite0:1" in [c.ref for c in zoo.all_cards()]  # built-ins stay beside


def test_a_card_in_the_wrong_folder_or_in_two_repositories_is_refused(repo, tmp_path):
    zoo.add_repository(repo)
    wrong = repo / "tiny_colour" / "3"
    wrong.mkdir()
    write_card(wrong, tiny_colour_model(wrong / "tiny.onnx"), version="4")
    with pytest.raises(zoo.CardError, match="the card says tiny_colour:4, but it lies in tiny_colour/3/"):
        zoo.get("tiny_colour:3")
    shutil.rmtree(wrong)
    twin = tmp_path / "twin"
    shutil.copytree(repo, twin)
    zoo.add_repository(twin)
    with pytest.raises(zoo.CardError, match="tiny_colour:1 is also in"):
        zoo.get("tiny_colour")


def test_a_card_inside_a_graph_needs_no_repository(repo):
    zoo.add_repository(repo)
    card = zoo.get("tiny_colour:2")
    param = OnnxInference(card).params["model"]
    assert isinstance(param, dict) and param["version"] == "2"  # the whole card, not a reference
    assert OnnxInference(zoo.get("efficientnet_lite0")).params["model"] == "efficientnet_lite0:1"


# ---- selectors ---------------------------------------------------------------------------------

def _cards(tmp_path):
    made = []
    for name, top1, ms, tags in (("fast", 0.70, 2.0, ["int8"]), ("mid", 0.77, 5.0, []), ("slow", 0.80, 9.0, [])):
        d = tmp_path / name
        d.mkdir()
        path = write_card(d, tiny_colour_model(d / "tiny.onnx"), name=name, tags=["colour", *tags], metrics={
            "imagenet_top1": {"value": top1, "source": "test"}, "ms_per_image": {"value": ms, "source": "test"}})
        made.append(zoo.load_card(path))
    return made


def test_select_returns_the_matches_cheapest_first(tmp_path):
    cards = _cards(tmp_path)
    assert [c.name for c in zoo.select(where=["imagenet_top1>=0.76"], cards=cards)] == ["mid", "slow"]
    assert [c.name for c in zoo.select(task="image-classification", cards=cards)] == ["fast", "mid", "slow"]
    assert [c.name for c in zoo.select(tags=["int8"], cards=cards)] == ["fast"]
    assert [c.name for c in zoo.select(**zoo.parse_selector("task=image-classification,imagenet_top1>0.7,"
                                                             "ms_per_image<=5"), cards=cards)] == ["mid"]


def test_a_selector_that_matches_nothing_says_what_excluded_what(tmp_path):
    cards = _cards(tmp_path)
    with pytest.raises(zoo.SelectorError) as err:
        zoo.select(task="image-classification", where=["imagenet_top1>=0.9", "gflops<=1"], cards=cards)
    text = str(err.value)
    assert "no model matches task=image-classification, imagenet_top1>=0.9, gflops<=1" in text
    assert "fast:1 has imagenet_top1 0.7 (needs imagenet_top1>=0.9); has no gflops metric (needs gflops<=1)" in text
    with pytest.raises(zoo.SelectorError, match="cannot read the bound 'top1 ~ 3'"):
        zoo.parse_selector("top1 ~ 3")


# ---- several named inputs and outputs, end to end ----------------------------------------------

def two_output_model(path):
    """pixels [N,3,32,32] -> logits [N,3] (channel means x10) and brightness [N,1] (their mean)."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, 32, 32])
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("brightness", TensorProto.FLOAT, ["N", 1])]
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Mul", ["m", "ten"], ["logits"]),
             helper.make_node("ReduceMean", ["m"], ["brightness"], axes=[1], keepdims=1)]
    ten = numpy_helper.from_array(np.array(10.0, np.float32), "ten")
    return _save(helper.make_graph(nodes, "two_out", [x], outs, [ten]), path)


def two_input_model(path):
    """logits [N,3] and brightness [N,1] -> adjusted [N,3] = logits - brightness."""
    ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
           helper.make_tensor_value_info("brightness", TensorProto.FLOAT, ["N", 1])]
    out = helper.make_tensor_value_info("adjusted", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Sub", ["logits", "brightness"], ["adjusted"])]
    return _save(helper.make_graph(nodes, "two_in", ins, [out]), path)


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_several_named_inputs_and_outputs_run_end_to_end(tmp_path, colour_dir, runner):
    d = tmp_path / "models"
    d.mkdir()
    image = dict(name="pixels", dtype="float32", shape=[3, 32, 32], layout="NCHW", channels="RGB",
                 value_range=[-1, 1])
    (d / "a").mkdir()
    (d / "b").mkdir()
    first = zoo.load_card(write_card(d / "a", two_output_model(d / "a" / "two_out.onnx"), name="two_out",
                                     inputs=[image], task="other", labels=None,
                                     outputs=[dict(name="logits", dtype="float32", shape=[3]),
                                              dict(name="brightness", dtype="float32", shape=[1])]))
    second = zoo.load_card(write_card(d / "b", two_input_model(d / "b" / "two_in.onnx"), name="two_in",
                                      task="other", labels=None, preprocess=None,
                                      inputs=[dict(name="logits", dtype="float32", shape=[3]),
                                              dict(name="brightness", dtype="float32", shape=[1])],
                                      outputs=[dict(name="adjusted", dtype="float32", shape=[3])]))
    p = Pipeline()
    rows = (p | Files(str(colour_dir / "**" / "*")) | ReadFiles() | DecodeImage()
            | ResizeCrop.for_input(first.input, resize=36)
            | OnnxInference(first, inputs={"pixels": "pixels"}, id="two_out")
            | OnnxInference(second, keep_input=True, outputs={"adjusted": "adjusted"}, id="two_in"))
    rows | WriteParquet(str(tmp_path / "out" / "predictions"))
    p.dead_letters | WriteParquet(str(tmp_path / "out" / "dead_letter"), id="write_dead_letters")
    stats = run_graph(p.graph, runner)
    assert (stats.inputs, stats.scored, stats.failed) == (9, 9, 0)
    for r in read(tmp_path / "out"):
        logits, bright, adjusted = (np.asarray(r[k], np.float32).reshape(-1) for k in
                                    ("logits", "brightness", "adjusted"))
        assert np.allclose(bright, logits.mean() / 10, atol=1e-5)
        assert np.allclose(adjusted, logits - bright, atol=1e-5)
        assert COLOURS[int(np.argmax(adjusted))] in os.path.basename(r["path"])


def test_inference_refuses_a_mapping_that_does_not_fit_the_card(tmp_path, user_card):
    card = zoo.load_card(user_card)
    with pytest.raises(ValueError, match="outputs names 'scores', which tiny_colour:1 does not have"):
        OnnxInference(card, outputs={"scores": "s"})
    with pytest.raises(ValueError, match="inputs must map every input"):
        OnnxInference(card, inputs={})


# ---- the command line --------------------------------------------------------------------------

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "beamzoo.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})


def score(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress",
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})


def test_score_images_scores_with_a_users_card(tmp_path, user_card, colour_dir):
    out = score("--input", str(colour_dir / "**" / "*"), "--output", str(tmp_path / "out"), "--model", user_card,
                "--topk", "2", "--runner=EdgeRunner")
    assert out.returncode == 0, out.stderr
    assert "inputs: 9  scored: 9  dead letters: 0" in out.stdout
    rows = read(tmp_path / "out")
    assert all(r["label"] in os.path.basename(r["path"]) and r["model"] == "tiny_colour:1" for r in rows)


def test_score_images_select_picks_the_cheapest_match_and_says_so(tmp_path, colour_dir):
    (tmp_path / "made").mkdir()
    _cards(tmp_path / "made")
    repo = tmp_path / "repo"
    for name in ("fast", "mid", "slow"):
        shutil.copytree(tmp_path / "made" / name, repo / name / "1")
    out = score("--input", str(colour_dir / "*"), "--output", str(tmp_path / "out"), "--zoo", str(repo),
                "--select", "tag=colour,imagenet_top1>=0.76", "--topk", "1", "--runner=EdgeRunner")
    assert out.returncode == 0, out.stderr
    assert "--select picked mid:1, the cheapest of 2 matching: mid:1, slow:1" in out.stdout
    assert {r["model"] for r in read(tmp_path / "out")} == {"mid:1"}
    none = score("--input", str(colour_dir / "*"), "--output", str(tmp_path / "o2"), "--zoo", str(repo),
                 "--select", "imagenet_top1>=0.99")
    assert none.returncode == 2 and "no model matches imagenet_top1>=0.99" in none.stderr
    assert "Traceback" not in none.stderr


def test_score_images_refuses_a_bad_card_naming_it(tmp_path):
    (tmp_path / "c").mkdir()
    path = write_card(tmp_path / "c", tiny_colour_model(tmp_path / "c" / "tiny.onnx"), sha256="1" * 64)
    out = score("--output", str(tmp_path / "out"), "--model", path)
    assert out.returncode == 2 and path in out.stderr and "pins 1111" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out" / "predictions").exists()


def test_a_users_model_exports_to_a_bundle_that_runs(tmp_path, user_card, colour_dir):
    out = score("--export", str(tmp_path / "bundle"), "--model", user_card, "--topk", "1")
    assert out.returncode == 0, out.stderr
    os.remove(user_card)  # the bundle carries the model, not a reference to the card
    ran = cli("run", str(tmp_path / "bundle"), "--input", str(colour_dir / "*"), "--output", str(tmp_path / "o"),
              "--no_progress")
    assert ran.returncode == 0, ran.stderr
    assert "inputs: 6  scored: 6  dead letters: 0" in ran.stdout


def test_models_list_show_and_verify(tmp_path, repo):
    listed = cli("models", "list", "--json", "--zoo", str(repo))
    assert listed.returncode == 0, listed.stderr
    refs = [m["model"] for m in json.loads(listed.stdout)]
    assert {"efficientnet_lite0:1", "tiny_colour:1", "tiny_colour:2", "tiny_colour:10"} <= set(refs)
    shown = cli("models", "show", "tiny_colour", "--json", "--zoo", str(repo))
    assert json.loads(shown.stdout)["version"] == "10"
    ok = cli("models", "verify", "--zoo", str(repo))
    assert ok.returncode == 0 and "tiny_colour:2: ok" in ok.stdout, ok.stdout + ok.stderr
    with open(repo / "tiny_colour" / "2" / "tiny.onnx", "ab") as f:
        f.write(b"\0")
    bad = cli("models", "verify", "--zoo", str(repo))
    assert bad.returncode == 1 and "tiny_colour:2: FAILED" in bad.stdout and "tiny_colour:1: ok" in bad.stdout
    unknown = cli("models", "show", "nope")
    assert unknown.returncode == 2 and "no model named 'nope'" in unknown.stderr


def test_the_docs_card_documents_every_field_and_loads(tmp_path):
    from beamzoo.zoo.card import OPTIONAL, REQUIRED
    page = open(os.path.join(ROOT, "docs", "zoo.md"), encoding="utf-8").read()
    block = page.split("## A card\n\n```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    assert set(data) == set(REQUIRED + OPTIONAL) - {"build"}  # build is for built-in cards only
    model = tmp_path / "cat_or_not.onnx"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    _save(helper.make_graph([helper.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0),
                             helper.make_node("MatMul", ["m", "w"], ["logits"])], "cat", [x], [y], [w]), model)
    (tmp_path / "card.yaml").write_text(block.replace("3f1c...e9", zoo.sha256_of(model)))
    card = zoo.load_card(tmp_path / "card.yaml")
    assert card.ref == "cat_or_not:2" and card.labels == ("cat", "not_cat") and card.metric("ms_per_image") == 6.5


def test_models_list_into_a_pipe_closed_early_is_no_error():
    # `beamzoo models list | head`: here the reader is gone before the interpreter has started
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m beamzoo.cli models list | true"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr

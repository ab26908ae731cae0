"""A card names only its own files: inside its folder, regular, bounded; its YAML has no aliases;
a model onnxruntime cannot load is refused when the card loads, as one error line."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from beamzoo import zoo
from beamzoo.bundle import export
from beamzoo.pipeline import score_images
from beamzoo.transforms.inference import OnnxInference
from beamzoo.zoo import files
from conftest import COLOURS, ROOT, error_line, tiny_card, tiny_colour_model

SECRET = "the first line of a file that is not the card's\n"


def write_card(folder, model="tiny.onnx", **changes) -> str:
    """A card for ``tiny_colour_model`` in ``folder``: the model (built when missing) and labels beside it."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    model_path = os.path.join(folder, model)
    if not os.path.lexists(model_path):
        tiny_colour_model(model_path)
    sha = zoo.sha256_of(model_path) if os.path.isfile(model_path) else "0" * 64
    if not os.path.lexists(os.path.join(folder, "labels.txt")):
        with open(os.path.join(folder, "labels.txt"), "w") as f:
            f.write("\n".join(COLOURS) + "\n")
    card = dict(name="tiny_colour", version="1", task="image-classification", file=model, sha256=sha,
                inputs=[dict(name="images", dtype="float32", shape=[3, 32, 32], layout="NCHW", channels="RGB",
                             value_range=[-1, 1])],
                outputs=[dict(name="logits", dtype="float32", shape=[3])], labels="labels.txt")
    card.update(changes)
    card = {k: v for k, v in card.items() if v is not None}
    path = os.path.join(folder, "card.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(card, f)
    return path


@pytest.fixture
def outside(tmp_path):
    """A folder beside the card's, with a labels-like secret and a model in it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(SECRET * 3)
    tiny_colour_model(d / "secret.onnx")
    return d


def refused(path, field=None) -> str:
    with pytest.raises((zoo.CardError, zoo.ModelIntegrityError)) as err:
        zoo.load_card(path)
    text = str(err.value)
    if field is not None:
        assert f"field {field!r}" in text, text
    return text


def bounded(fn, seconds=60):
    """``fn()``'s exception (or None), failing the test if it has not returned in ``seconds``
    (a read of a pipe or a device that never ends)."""
    out = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: B902 - handed to the test
            out["exc"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still reading after {seconds} s: it opened a pipe or a device"
    return out.get("exc")


# ---- files outside the card's folder -----------------------------------------------------------

@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_labels_outside_the_cards_folder_are_refused_unread(tmp_path, outside, how):
    given = "../outside/secret.txt" if how == "relative" else str(outside / "secret.txt")
    text = refused(write_card(tmp_path / "card", labels=given), "labels")
    assert "lies outside" in text and "own folder" in text
    assert "first line" not in text


def test_a_link_out_of_the_folder_is_refused_and_one_inside_is_followed(tmp_path, outside):
    card = tmp_path / "card"
    card.mkdir()
    os.symlink(outside / "secret.txt", card / "labels.txt")
    text = refused(write_card(card), "labels")
    assert "lies outside" in text and "first line" not in text
    os.remove(card / "labels.txt")
    (card / "names.txt").write_text("\n".join(COLOURS) + "\n")
    os.symlink("names.txt", card / "labels.txt")
    assert zoo.load_card(write_card(card)).labels == COLOURS


def test_a_models_file_outside_the_folder_is_refused_before_it_is_hashed(tmp_path, outside):
    foreign = zoo.sha256_of(outside / "secret.onnx")
    for given in ("../outside/secret.onnx", str(outside / "secret.onnx")):
        text = refused(write_card(tmp_path / "card", file=given, sha256="0" * 64), "file")
        assert "lies outside" in text and foreign not in text
    card = tmp_path / "linked"
    card.mkdir()
    os.symlink(outside / "secret.onnx", card / "tiny.onnx")
    text = refused(write_card(card, sha256="0" * 64), "file")
    assert "lies outside" in text and foreign not in text


def test_a_repository_card_may_name_files_of_its_repository_only(tmp_path, outside, monkeypatch):
    monkeypatch.setattr("beamzoo.zoo.repository._extra", [])
    monkeypatch.delenv("BEAMZOO_ZOO", raising=False)
    repo = tmp_path / "repo"
    (repo / "shared").mkdir(parents=True)
    (repo / "shared" / "colours.txt").write_text("\n".join(COLOURS) + "\n")
    write_card(repo / "tiny_colour" / "1", labels="../../shared/colours.txt")
    zoo.add_repository(repo)
    assert zoo.get("tiny_colour:1").labels == COLOURS
    write_card(repo / "tiny_colour" / "1", labels="../../../outside/secret.txt")
    with pytest.raises(zoo.CardError, match="lies outside .*repo .*or its repository") as err:
        zoo.get("tiny_colour:1")
    assert "first line" not in str(err.value)


# ---- devices and pipes -------------------------------------------------------------------------

CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a device read whole fails here, not the machine
from beamzoo.zoo import files
from beamzoo.zoo.card import CardError, read_card
try:
    read_card(sys.argv[1]) if sys.argv[2] == "card" else files.read(sys.argv[1], files.LABELS_MAX)
except (CardError, files.Refused) as exc:
    print("refused:", exc)
"""


@pytest.mark.skipif(not os.path.exists("/dev/zero") or sys.platform != "linux", reason="needs /dev/zero")
def test_a_device_is_refused_without_reading_it(tmp_path):
    card = tmp_path / "card"
    write_card(card, labels="/dev/zero")
    named = subprocess.run([sys.executable, "-c", CHILD, str(card / "card.yaml"), "card"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert "refused:" in named.stdout and "field 'labels'" in named.stdout and "lies outside" in named.stdout, \
        named.stderr[-2000:]
    read = subprocess.run([sys.executable, "-c", CHILD, "/dev/zero", "file"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert "refused: is not a regular file" in read.stdout, read.stderr[-2000:]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("which", ["labels", "file", "card"])
def test_a_pipe_is_refused_without_hanging(tmp_path, which):
    card = tmp_path / "card"
    card.mkdir()
    if which == "labels":
        os.mkfifo(card / "labels.txt")
        path = write_card(card)
    elif which == "file":
        os.mkfifo(card / "tiny.onnx")
        path = write_card(card)
    else:
        path = str(card / "card.yaml")
        os.mkfifo(path)
    exc = bounded(lambda: zoo.load_card(path))
    assert isinstance(exc, zoo.CardError) and "not a regular file" in str(exc), exc


# ---- YAML with limits --------------------------------------------------------------------------

def test_yaml_aliases_are_refused(tmp_path):
    path = write_card(tmp_path / "card", labels=None)
    with open(path, "a") as f:
        f.write("labels: &c [red, green, blue]\ntags: *c\n")
    text = refused(path)
    assert "no anchors (&) or aliases (*)" in text


def test_a_billion_laughs_card_is_refused_at_once(tmp_path):
    levels = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "card.yaml"
    bomb.write_text("name: bomb\n" + "\n".join(levels) + "\nlabels: *l9\n")
    assert bomb.stat().st_size < 2000  # a kilobyte that would be 10**9 strings
    start = time.process_time()
    with pytest.raises(zoo.CardError, match="no anchors"):
        zoo.load_card(bomb)
    assert time.process_time() - start < 5  # refused before anything expands (milliseconds)


def test_a_card_file_over_its_cap_is_refused_unread(tmp_path):
    big = tmp_path / "card.yaml"
    with open(big, "wb") as f:
        f.truncate(files.CARD_MAX + 1)
    with pytest.raises(zoo.CardError, match="more than the 1.0 MiB allowed"):
        zoo.load_card(big)


def test_a_huge_value_is_cut_in_the_error(tmp_path):
    huge = "X" * 500_000
    for changes in (dict(name=huge), dict(tags=[huge, 1]), {huge: 1}, dict(labels=huge), dict(file=huge + "\0")):
        text = refused(write_card(tmp_path / "card", **changes))
        assert len(text) < 1000 and "..." in text, text[:2000]


# ---- the model file ----------------------------------------------------------------------------

def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io to count bytes read")
def test_a_model_file_over_2_gib_is_refused_before_it_is_read(tmp_path):
    card = tmp_path / "card"
    card.mkdir()
    with open(card / "big.onnx", "wb") as f:
        f.truncate(2 << 30)  # sparse: no disk used
    before = _bytes_read()
    text = refused(write_card(card, file="big.onnx", sha256="0" * 64), "file")
    assert "more than the 2048.0 MiB allowed" in text
    graph_card = tiny_card(tiny_colour_model(tmp_path / "t.onnx"), file=str(card / "big.onnx"))
    with pytest.raises(zoo.ModelIntegrityError, match="more than the 2048.0 MiB allowed"):
        zoo.model_bytes(graph_card)
    assert _bytes_read() - before < 1 << 20  # refused from its size, not read


def test_a_model_is_hashed_as_it_is_read_and_matches_its_pin(tmp_path):
    card = zoo.load_card(write_card(tmp_path / "card"))
    with open(card.file, "rb") as f:
        assert zoo.model_bytes(card) == f.read()
    with open(card.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(zoo.ModelIntegrityError, match="has sha256 .* pins"):
        zoo.model_bytes(tiny_card(card.file, sha256=card.sha256))


def test_a_model_with_external_data_is_refused(tmp_path):
    card = tmp_path / "card"
    card.mkdir()
    model = onnx.load(str(tiny_colour_model(tmp_path / "whole.onnx")))
    onnx.save_model(model, str(card / "tiny.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tiny.onnx.data", size_threshold=0)
    assert (card / "tiny.onnx.data").is_file()
    text = refused(write_card(card), "file")
    assert "external data file" in text and "save_as_external_data=False" in text


# ---- models onnxruntime cannot load ------------------------------------------------------------

def custom_op_card(folder) -> str:
    """A classifier whose one node is an operator of a domain onnxruntime does not know."""
    folder.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    node = helper.make_node("Frobnicate", ["images"], ["logits"], domain="com.example.custom")
    model = helper.make_model(helper.make_graph([node], "custom", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example.custom", 1)])
    model.ir_version = 8
    onnx.save(model, str(folder / "tiny.onnx"))
    return write_card(folder, preprocess=dict(resize=36, crop=32))


def test_a_custom_operator_model_is_refused_when_its_card_loads(tmp_path):
    text = refused(custom_op_card(tmp_path / "card"), "file")
    assert "onnxruntime cannot load the model" in text and "'com.example.custom'" in text
    assert "standard ONNX operators" in text and "\n" not in text


def _cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_custom_operator_model_is_one_error_line_from_each_command(tmp_path, colour_dir):
    path = custom_op_card(tmp_path / "card")
    shown = _cli("-m", "beamzoo.cli", "models", "show", path)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert "onnxruntime cannot load the model" in error_line(shown.stderr)
    scored = _cli(os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress", "--model", path,
                  "--input", str(colour_dir / "*"), "--output", str(tmp_path / "out"))
    assert scored.returncode == 2 and "Traceback" not in scored.stderr
    assert "'com.example.custom'" in error_line(scored.stderr)
    # A bundle made through the API (which makes no session) refuses when it runs.
    graph = score_images(str(colour_dir), str(tmp_path / "o1"), _graph_card(path), topk=1)
    bundle = export(graph, tmp_path / "bundle")
    ran = _cli("-m", "beamzoo.cli", "run", str(bundle), "--input", str(colour_dir / "*"), "--output",
               str(tmp_path / "o2"), "--no_progress")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "onnxruntime cannot load the model" in error_line(ran.stderr)


def _graph_card(path):
    """The card as a graph holds it, its file absolute: no session is made until a run sets it up."""
    d = yaml.safe_load(open(path))
    d["file"] = os.path.join(os.path.dirname(path), d["file"])
    d["labels"] = list(COLOURS)
    return zoo.card_from_dict(d, path, base=None)


def test_a_session_onnxruntime_refuses_is_a_card_error(tmp_path):
    path = custom_op_card(tmp_path / "card")
    infer = OnnxInference(_graph_card(path))
    with pytest.raises(zoo.CardError, match="onnxruntime cannot load the model .*custom operators"):
        infer.setup()

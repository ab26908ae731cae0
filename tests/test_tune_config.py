"""A tuned config (``beamzoo.tune.config``) read where the knobs are: ``score_images.py --config``,
``ocr_images.py --config``, ``beamzoo serve --config`` and ``--export``; a flag on the command line wins."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest

from beamzoo.serve.client import Client
from beamzoo.tune.config import Config, ConfigError, read, write
from beamzoo.zoo import sha256_of
from conftest import ROOT, error_line, tiny_colour_model, write_colour_image
from tests.test_serve_http import metric

CLASSIFY_MESSAGE = ("a config for the ocr graph (ocr_images.py, beamzoo tune --ocr); "
                    "this command runs the classify graph")


def pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(ROOT, "pipelines", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A card file of the tiny colour model and three colour images."""
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_colour_model(d / "tiny.onnx")
    card = {"name": "tiny_colour", "version": "1", "task": "image-classification", "file": "tiny.onnx",
            "sha256": sha256_of(model), "labels": ["red", "green", "blue"],
            "inputs": [{"name": "images", "dtype": "float32", "shape": [3, 32, 32], "layout": "NCHW",
                        "channels": "RGB", "value_range": [-1, 1]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [3]}],
            "preprocess": {"resize": 36, "crop": 32}}
    (d / "card.json").write_text(json.dumps(card))
    (d / "images").mkdir()
    for i, rgb in enumerate([(230, 20, 20), (20, 230, 20), (20, 20, 230)]):
        write_colour_image(d / "images" / f"{i}.png", rgb)
    return d


def tuned(path, graph="classify", **sections) -> str:
    write(path, Config(graph, **sections, command="beamzoo tune --input 'photos/*.jpg' --config tuned.yaml"))
    return str(path)


def score(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress",
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def topk_lengths(out) -> set[int]:
    rows = pq.read_table(os.path.join(out, "predictions")).column("topk_labels").to_pylist()
    assert len(rows) == 3
    return {len(r) for r in rows}


# ---------------------------------------------------------------- the file

def test_a_config_is_written_as_the_design_says_and_reads_back(tmp_path):
    config = Config("classify", {"model": "efficientnet_lite0_int8:1", "batch_size": 8, "threads": 1,
                                 "escalate_below": 0.35}, serve={"max_batch": 8, "max_delay_ms": 5.0},
                    budgets={"classify/infer": 0.004, "classify/decode": 0.003},
                    targets=["throughput>=80", "agreement>=0.97"], predicted={"throughput": 91.0, "cost": 0.021},
                    measured={"throughput": 88.4, "cost": 0.022},
                    command="beamzoo tune --input 'photos/*.jpg' --target throughput>=80")
    write(tmp_path / "tuned.yaml", config)
    text = (tmp_path / "tuned.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# written by: beamzoo tune --input 'photos/*.jpg' --target throughput>=80"
    assert lines[1:3] == ["beamzoo: tuned config 1", "graph: classify"]
    assert "targets: [throughput>=80, agreement>=0.97]" in lines
    assert read(tmp_path / "tuned.yaml", "classify") == config


@pytest.mark.parametrize("text, words", [
    (None, "tuned.yaml: no such file; write one with beamzoo tune"),
    ("beamzoo: [tuned\n", "tuned.yaml: is not valid YAML (line 2)"),
    ("- a\n- b\n", "tuned.yaml: must be a mapping of keys"),
    ("graph: classify\n", "tuned.yaml: is not a tuned config (it has no 'beamzoo: tuned config 1' line)"),
    ("beamzoo: tuned config 2\ngraph: classify\n", "tuned.yaml: is a 'tuned config 2'; this beamzoo reads"),
    ("beamzoo: tuned config 1\ngraph: classify\ncolour: red\n",
     "tuned.yaml: 'colour' is not a key of a tuned config; the keys are beamzoo, graph, knobs, serve, budgets"),
    ("beamzoo: tuned config 1\ngraph: ocr\n", CLASSIFY_MESSAGE),
    ("beamzoo: tuned config 1\ngraph: video\n", "tuned.yaml: graph: must be one of classify, ocr, got 'video'"),
    ("beamzoo: tuned config 1\ngraph: classify\nbudgets: {classify/infer: -1}\n",
     "tuned.yaml: budgets: classify/infer must be a positive number of seconds per row, got -1"),
    ("beamzoo: tuned config 1\ngraph: classify\nbudgets: {classify/infer: true}\n",
     "budgets: classify/infer must be a positive number"),
    ("beamzoo: tuned config 1\ngraph: classify\nbudgets: [0.1]\n",
     "tuned.yaml: budgets: must be a mapping of step id -> seconds per row, got list"),
    ("beamzoo: tuned config 1\ngraph: classify\nknobs: {batch_size: [1, 2]}\n",
     "tuned.yaml: knobs: batch_size must be a number, text or true/false, got list"),
    ("beamzoo: tuned config 1\ngraph: classify\ntargets: ['speed>=3']\n",
     "tuned.yaml: targets: --target 'speed>=3': unknown metric 'speed'"),
    ("a: &x [1, 2]\nb: *x\n", "a tuned config has no anchors (&) or aliases (*)"),
])
def test_a_config_that_cannot_be_used_is_refused_in_one_line_naming_the_file(text, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / "tuned.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        read("tuned.yaml", "classify")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("tuned.yaml: ") and words in message, message


# ---------------------------------------------------------------- score_images.py

def test_the_file_sets_the_flags_and_a_flag_on_the_command_line_wins_wherever_it_stands(tiny, tmp_path):
    parse = pipeline("score_images").parse
    f = tuned(tmp_path / "tuned.yaml", knobs={"model": str(tiny / "card.json"), "batch_size": 3, "threads": 0,
                                              "workers": 2, "shrink": "linear", "no_isolation": True,
                                              "max_bytes": "512M", "adapt": True})
    args, _, card = parse(["--output", str(tmp_path / "o"), "--config", f])
    assert card.ref == "tiny_colour:1" and args.config.knobs["batch_size"] == 3
    assert (args.batch_size, args.intra_op_threads, args.workers, args.shrink) == (3, 0, 2, "linear")
    assert (args.isolate, args.max_bytes, args.adapt) == (False, 512 << 20, True)
    before, _, _ = parse(["--output", str(tmp_path / "o"), "--batch_size", "5", "--config", f])
    after, _, _ = parse(["--output", str(tmp_path / "o"), "--config", f, "--batch_size", "5", "--shrink", "area"])
    assert (before.batch_size, after.batch_size, after.shrink, after.workers) == (5, 5, "area", 2)
    plain, _, _ = parse(["--output", str(tmp_path / "o")])
    assert plain.config is None and plain.batch_size is None


@pytest.mark.parametrize("knobs, words", [
    ({"colour": "red"}, "knobs: 'colour' is not an option of score_images.py; its options: sign, model, max_bytes"),
    ({"input": "photos/*.jpg"}, "knobs: 'input' is not an option of score_images.py"),
    ({"batch_size": 0}, "knobs: batch_size must be between 1 and 65536, got 0"),
    ({"shrink": "cubic"}, "knobs: shrink must be one of area, linear, got 'cubic'"),
    ({"threads": "two"}, "knobs: threads: 'two' is not a whole number"),
    ({"no_isolation": 1}, "knobs: no_isolation: must be true or false, got 1"),
    ({"model": 3}, "knobs: model must be text, got 3"),
])
def test_a_knob_the_command_does_not_have_or_a_bad_value_is_refused_naming_it(knobs, words, tmp_path, capsys):
    f = tuned(tmp_path / "tuned.yaml", knobs=knobs)
    with pytest.raises(SystemExit) as exit_:
        pipeline("score_images").parse(["--output", str(tmp_path / "o"), "--config", f])
    assert exit_.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {f}: ") and words in line, line


def test_a_config_for_another_graph_is_refused_with_the_reason(tmp_path, capsys):
    f = tuned(tmp_path / "tuned.yaml", graph="ocr", knobs={"batch_size": 4})
    with pytest.raises(SystemExit):
        pipeline("score_images").parse(["--output", str(tmp_path / "o"), "--config", f])
    assert error_line(capsys.readouterr().err) == f"error: {f}: {CLASSIFY_MESSAGE}"


def test_score_images_runs_with_the_configs_knobs_and_a_flag_wins(tiny, tmp_path):
    f = tuned(tmp_path / "tuned.yaml", knobs={"model": str(tiny / "card.json"), "topk": 1, "batch_size": 2,
                                              "workers": 1})
    images = str(tiny / "images" / "*.png")
    run = score("--input", images, "--output", tmp_path / "a", "--runner", "EdgeRunner", "--config", f)
    assert run.returncode == 0, run.stderr[-2000:]
    assert topk_lengths(tmp_path / "a") == {1}  # the file's topk; the tiny model has 3 labels
    run = score("--input", images, "--output", tmp_path / "b", "--runner", "EdgeRunner", "--config", f, "--topk", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert topk_lengths(tmp_path / "b") == {2}


def test_adapt_runs_with_the_configs_budgets(tiny, tmp_path):
    f = tuned(tmp_path / "tuned.yaml", knobs={"model": str(tiny / "card.json"), "batch_size": 2},
              budgets={"classify/infer": 0.5, "classify/decode+resize": 0.5})
    args, _, _ = pipeline("score_images").parse(["--output", str(tmp_path / "o"), "--config", f, "--adapt"])
    assert args.adapt is True and args.config.budgets == {"classify/infer": 0.5, "classify/decode+resize": 0.5}
    run = score("--input", tiny / "images" / "*.png", "--output", tmp_path / "a", "--runner", "EdgeRunner",
                "--config", f, "--adapt")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "inputs: 3  scored: 3  dead letters: 0" in run.stdout


def test_a_bundle_exported_with_a_config_carries_the_tuned_knobs_and_runs_them(tiny, tmp_path):
    f = tuned(tmp_path / "tuned.yaml", knobs={"model": str(tiny / "card.json"), "batch_size": 3,
                                              "shrink": "linear", "topk": 1})
    run = score("--export", tmp_path / "bundle", "--config", f)
    assert run.returncode == 0, run.stderr[-2000:]
    steps = {s["id"]: s["params"] for s in json.loads((tmp_path / "bundle" / "graph.json").read_text())["steps"]}
    assert steps["classify/infer"]["batch_size"] == 3 and steps["classify/resize"]["shrink"] == "linear"
    run = score("--export", tmp_path / "bundle5", "--config", f, "--batch_size", "5")
    assert run.returncode == 0, run.stderr[-2000:]
    steps = {s["id"]: s["params"] for s in json.loads((tmp_path / "bundle5" / "graph.json").read_text())["steps"]}
    assert steps["classify/infer"]["batch_size"] == 5
    ran = subprocess.run([sys.executable, "-m", "beamzoo.cli", "run", str(tmp_path / "bundle"), "--input",
                          str(tiny / "images" / "*.png"), "--output", str(tmp_path / "out"), "--no_progress"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert topk_lengths(tmp_path / "out") == {1}  # the tuned topk, with no flag to `beamzoo run`


# ---------------------------------------------------------------- ocr_images.py

def test_ocr_images_reads_an_ocr_config_and_refuses_a_classify_one(tmp_path, capsys):
    parse = pipeline("ocr_images").parse
    f = tuned(tmp_path / "ocr.yaml", graph="ocr", knobs={"batch_size": 4, "threads": 2, "min_score": 0.6,
                                                         "workers": 3}, budgets={"ocr/detect": 0.05})
    args, _ = parse(["--input", "x", "--output", str(tmp_path / "o"), "--config", f, "--min_score", "0.7"])
    assert (args.batch_size, args.intra_op_threads, args.workers, args.min_score) == (4, 2, 3, 0.7)
    assert args.config.budgets == {"ocr/detect": 0.05}
    g = tuned(tmp_path / "tuned.yaml", knobs={"batch_size": 4})
    with pytest.raises(SystemExit) as exit_:
        parse(["--input", "x", "--output", str(tmp_path / "o"), "--config", g])
    assert exit_.value.code == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: {g}: a config for the classify graph (score_images.py, beamzoo serve); "
        "this command runs the ocr graph")


def test_ocr_images_refuses_a_classify_knob(tmp_path, capsys):
    f = tuned(tmp_path / "ocr.yaml", graph="ocr", knobs={"shrink": "area"})
    with pytest.raises(SystemExit):
        pipeline("ocr_images").parse(["--input", "x", "--output", str(tmp_path / "o"), "--config", f])
    assert "knobs: 'shrink' is not an option of ocr_images.py; its options: " in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- beamzoo serve

def serve_args(*argv):
    from beamzoo.cli import parser
    return parser().parse_args(["serve", *map(str, argv)])


def test_serve_takes_the_serve_section_and_the_models_knobs(tmp_path):
    from beamzoo.serve.command import served_knobs
    f = tuned(tmp_path / "tuned.yaml", knobs={"model": "efficientnet_lite0", "batch_size": 8, "workers": 2,
                                              "threads": 0, "shrink": "linear", "topk": 2},
              serve={"max_batch": 4, "max_delay_ms": 2.0, "workers": 3})
    args = serve_args("--config", f, "--max_delay_ms", "7")
    assert (args.max_batch, args.max_delay_ms, args.workers, args.topk) == (4, 7.0, 3, 2)
    assert served_knobs(args.config) == {"intra_op_threads": 0, "shrink": "linear"}
    assert args.model == []  # filled in when the command line names no model nor bundle


@pytest.mark.parametrize("sections, words", [
    ({"graph": "ocr"}, "a config for the ocr graph (ocr_images.py, beamzoo tune --ocr); "
                       "this command runs the classify graph"),
    ({"knobs": {"model": "a", "escalate": "b", "escalate_below": 0.3}},
     "knobs: escalate: the config is a cascade, and beamzoo serve serves single models"),
    ({"serve": {"max_batchez": 4}}, "serve: 'max_batchez' is not an option of beamzoo serve; its options:"),
    ({"serve": {"max_batch": 0}}, "serve: max_batch must be between 1 and 65536, got 0"),
    ({"knobs": {"colour": "red"}}, "knobs: 'colour' is not a knob of the classify graph beamzoo serve runs"),
])
def test_serve_refuses_a_config_it_cannot_use_in_one_line(sections, words, tmp_path, capsys):
    from beamzoo.cli import main
    f = tuned(tmp_path / "tuned.yaml", **{"graph": "classify", **sections})
    assert main(["serve", "--config", f, "--port", "0"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {f}: ") and words in line, line


def test_serve_serves_the_configs_model_with_its_max_batch(tiny, tmp_path):
    f = tuned(tmp_path / "tuned.yaml", knobs={"model": str(tiny / "card.json"), "topk": 1, "batch_size": 16},
              serve={"max_batch": 2, "max_delay_ms": 20.0, "workers": 1})
    proc = subprocess.Popen([sys.executable, "-m", "beamzoo.cli", "serve", "--config", f, "--port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+) \(tiny_colour:1\)", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        files = sorted(str(p) for p in (tiny / "images").glob("*.png"))
        with Client(m.group(1)) as c:
            preds = c.predict("tiny_colour", files + files[:2])  # five rows in one request
            status, text = c.request("GET", "/metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert [len(p["topk_labels"]) for p in preds] == [1] * 5  # the file's topk
    text = text if isinstance(text, str) else text.decode()
    batches = metric(text, "beamzoo_batch_rows_count", model="tiny_colour")
    assert metric(text, "beamzoo_batch_rows_sum", model="tiny_colour") == 5
    assert batches >= 3 and metric(text, "beamzoo_batch_rows_bucket", model="tiny_colour", le="2.0") == batches

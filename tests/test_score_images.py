"""The pipeline users run, with the real model on real photographs, on both local runners."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badfiles import make_all
from beamzoo.samples import make_sample_set
from conftest import ROOT, assert_same_rows, read

pytestmark = pytest.mark.integration

CATS = {"tabby", "tiger cat", "Egyptian cat"}


def score_cmd(*args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress", *args]


def score(*args: str) -> str:
    """Run the score pipeline as a user would; its output."""
    out = subprocess.run(score_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The sample photographs and the odd files of badfiles.py."""
    d = tmp_path_factory.mktemp("photos")
    make_sample_set(d / "samples")
    make_all(d / "odd")
    return d


@pytest.fixture(scope="module")
def results(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    logs = {}
    for runner in ("EdgeRunner", "DirectRunner"):
        logs[runner] = score("--input", str(images / "**" / "*.*"), "--output", str(out / runner),
                             f"--runner={runner}")
    return out, logs


def test_both_runners_score_every_input_and_print_the_counts(results):
    _, logs = results
    for log in logs.values():
        assert "inputs: 24  scored: 19  dead letters: 5" in log


def test_both_runners_give_the_same_rows(results):
    out, _ = results
    assert_same_rows(read(out / "EdgeRunner"), read(out / "DirectRunner"))
    assert read(out / "EdgeRunner", "dead_letter") == read(out / "DirectRunner", "dead_letter")


def test_real_photographs_get_the_right_labels(results):
    out, _ = results
    rows = {os.path.basename(r["path"]): r for r in read(out / "EdgeRunner")}
    assert CATS & set(rows["chelsea.png"]["topk_labels"])
    assert rows["coffee.png"]["label"] == "espresso"
    # Odd encodings of the same cat photograph still look like a cat.
    for name in ("good.jpg", "deep16.png", "rgba.png", "exif_rotated.jpg", "large.jpg"):
        assert rows[name]["label"] in CATS, (name, rows[name]["topk_labels"])
    assert rows["chelsea.png"]["model"] == "efficientnet_lite0:1"


def test_output_schema(results):
    out, _ = results
    pred = pq.read_schema(next((out / "EdgeRunner" / "predictions").glob("part-*.parquet")))
    assert pred.field("path").type == pa.string() and pred.field("label").type == pa.string()
    assert pred.field("score").type == pa.float32()
    assert pred.field("topk_labels").type == pa.list_(pa.string())
    assert pred.field("topk_scores").type == pa.list_(pa.float32())
    assert pred.field("model").type == pa.string()
    dead = read(out / "EdgeRunner", "dead_letter")
    assert {os.path.basename(r["source"]): r["stage"] for r in dead} == {
        "empty.jpg": "classify/read", "text.jpg": "classify/decode", "truncated.jpg": "classify/decode",
        "truncated.png": "classify/decode", "bomb.png": "classify/decode"}


def test_quick_start_scores_the_embedded_sample_set(tmp_path):
    log = score("--output", str(tmp_path), "--runner=EdgeRunner")
    assert "inputs: 12  scored: 12  dead letters: 0" in log
    rows = {os.path.basename(r["path"]): r for r in read(tmp_path)}
    assert rows["coffee.png"]["label"] == "espresso"


def test_bilinear_shrink_scores_the_same_photos_under_a_new_graph_version(tmp_path):
    area, linear = tmp_path / "area", tmp_path / "linear"
    score("--output", str(area), "--runner=EdgeRunner")
    score("--output", str(linear), "--runner=EdgeRunner", "--shrink", "linear")
    a = {os.path.basename(r["path"]): r for r in read(area)}
    b = {os.path.basename(r["path"]): r for r in read(linear)}
    assert b["coffee.png"]["label"] == "espresso" and CATS & set(b["chelsea.png"]["topk_labels"])
    assert a["coffee.png"]["score"] != b["coffee.png"]["score"]  # other pixels
    assert not {r["key"] for r in a.values()} & {r["key"] for r in b.values()}


def test_bad_arguments_get_clear_errors(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--output", str(tmp_path),
           "--input", str(tmp_path / "missing" / "*.jpg"), "--runner=EdgeRunner"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "no files match" in out.stderr
    assert "Traceback" not in out.stderr


def test_progress_stays_out_of_logs(tmp_path):
    """Not a terminal (a log file, CI): no progress bar on any runner, only the summary."""
    for runner in ("EdgeRunner", "DirectRunner"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"),
                              "--output", str(tmp_path / runner), f"--runner={runner}"],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "row/s" not in out.stderr and "rows/s" not in out.stderr and "\r" not in out.stderr
        assert "inputs: 12  scored: 12  dead letters: 0" in out.stdout

"""OUT/report.html: what score_images.py and ocr_images.py write at the end of a run, its numbers
(escaped), a resumed and an empty run, a Beam run without a timeline, and the charts as headless
Chromium draws them."""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import cv2
import numpy as np
import pytest

import ocr_support as ocr
from badfiles import photo
from beamzoo.pipeline import score_images
from beamzoo.report import REPORT, Timeline, cumulative, page
from conftest import ROOT, debian_tool, read, run_graph, tiny_card, tiny_colour_model, write_colour_image

pytestmark = pytest.mark.integration

ODD_NAME = "notes <b>&'x'.jpg"  # a text file named .jpg, with characters HTML must escape


def cli(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", script), "--no_progress", *args],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def totals(report: str) -> dict[str, str]:
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r'data-total="([^"]*)">([^<]*)<', report)}


def bad_inputs(d) -> str:
    """A photograph, a truncated JPEG and a text file named .jpg."""
    d.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(d / "cat.jpg"), photo())
    data = (d / "cat.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(data[: len(data) // 3])
    (d / ODD_NAME).write_text("this is a text file, not a JPEG\n")
    return str(d / "*")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sample photographs; the bad inputs, then resumed with one more photograph."""
    d = tmp_path_factory.mktemp("report")
    samples = d / "samples"
    cli("score_images.py", "--output", str(samples), "--runner=EdgeRunner")
    bad = d / "bad"
    pattern = bad_inputs(d / "in")
    first = (cli("score_images.py", "--input", pattern, "--output", str(bad), "--runner=EdgeRunner"),
             (bad / REPORT).read_text())
    shutil.copy(d / "in" / "cat.jpg", d / "in" / "cat2.jpg")
    cli("score_images.py", "--input", pattern, "--output", str(bad), "--runner=EdgeRunner", "--resume")
    return {"samples": samples, "bad": bad, "bad_first": first}


def test_a_run_writes_its_totals_step_times_scores_and_commonest_labels(runs):
    out = runs["samples"]
    report = (out / REPORT).read_text()
    rows = read(out)
    t = totals(report)
    assert {k: t[k] for k in ("inputs", "scored", "dead letters", "already done", "runner", "model", "output")} == {
        "inputs": "12", "scored": "12", "dead letters": "0", "already done": "0", "runner": "EdgeRunner",
        "model": "efficientnet_lite0:1", "output": str(out)}
    assert float(t["seconds"].split()[0]) > 0 and t["first result after"].endswith(" s")
    assert "scored: 12" in report and "dead letters: 0" in report  # the timeline's final values
    assert "no dead letters" in report
    for step in ("classify/infer", "write"):
        assert f"{step} (" in report  # a bar of its share of the time
    assert "12 rows in the answers&#x27; files" in report
    mean = np.mean([r["score"] for r in rows])
    assert f"mean {mean:.3f}" in report
    for label, n in Counter(r["label"] for r in rows).most_common(5):
        assert f"<title>{html.escape(label)}</title>" in report  # a bar of the commonest labels
    assert "http://" not in report.replace("http://www.w3.org/2000/svg", "") and "https://" not in report


def test_dead_letters_by_stage_and_reason_with_their_inputs_escaped(runs):
    stdout, report = runs["bad_first"]
    assert f"report written to {runs['bad'] / REPORT}" in stdout
    t = totals(report)
    assert (t["inputs"], t["scored"], t["dead letters"]) == ("3", "1", "2")
    assert "ValueError: truncated JPEG" in report
    assert "ValueError: not an image in a known format" in report
    assert html.escape(str(runs["bad"].parent / "in" / ODD_NAME)) in report
    assert "<b>" not in report
    dead = read(runs["bad"], "dead_letter")
    assert {r["stage"] for r in dead} == {"classify/decode"} and "2 dead letters in the dead-letter files" in report


def test_a_resumed_run_reports_what_was_already_done(runs):
    report = (runs["bad"] / REPORT).read_text()
    t = totals(report)
    assert (t["inputs"], t["scored"], t["dead letters"], t["already done"]) == ("4", "1", "0", "3")
    assert "already done: 3" in report  # the timeline's series
    assert "2 rows in the answers&#x27; files" in report  # the folder's answers, both runs'
    assert "2 dead letters in the dead-letter files (every run into this folder)" in report


def test_an_empty_run_writes_a_report_too(tmp_path):
    manifest = tmp_path / "none.csv"
    manifest.write_text("uri\n")
    cli("score_images.py", "--input", str(manifest), "--output", str(tmp_path / "out"), "--runner=EdgeRunner")
    report = (tmp_path / "out" / REPORT).read_text()
    assert totals(report)["inputs"] == "0" and "no inputs" in report and "no scores in 0 rows" in report


def test_the_timeline_reads_the_runs_clock_and_a_beam_run_says_it_has_none(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    (tmp_path / "in").mkdir()
    for i in range(5):
        write_colour_image(tmp_path / "in" / f"red{i}.png", (230, 20, 20))
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    ticks = iter(range(1000, 10**6))
    timeline = Timeline()
    stats = run_graph(score_images(str(tmp_path / "in" / "*"), str(tmp_path / "edge"), card),
                      hooks=[timeline], clock=lambda: float(next(ticks)))
    assert (stats.inputs, stats.scored, stats.failed) == (6, 5, 1)
    assert sum(n for _, w, n in timeline.events if w == "scored") == 5
    assert sum(n for _, w, n in timeline.events if w == "dead") == 1
    assert all(t > 0 and t == int(t) for t, _, _ in timeline.events)  # whole seconds of the run's clock
    assert timeline.models == ["tiny_colour:1"] and len(timeline.answers) == len(timeline.dead_letters) == 1

    beam = Timeline()
    stats = run_graph(score_images(str(tmp_path / "in" / "*"), str(tmp_path / "beam"), card), "DirectRunner",
                      beam_args=["--direct_num_workers=1"], hooks=[beam])
    text = page(str(tmp_path / "beam"), stats, beam)
    assert beam.events == [] and "DirectRunner reports its metrics only when the job has ended" in text
    assert "5 rows in the answers" in text  # the files are read all the same


def test_a_long_timeline_is_drawn_with_few_points():
    events = [(i / 1000, 1) for i in range(5000)]
    pts = cumulative(events, 5.0)
    assert len(pts) <= 302 and pts[0] == (0.0, 0.0) and pts[-1] == (5.0, 5000.0)
    assert all(a[1] <= b[1] for a, b in zip(pts, pts[1:]))
    assert cumulative([(1.0, 3)], 2.0) == [(0.0, 0.0), (1.0, 0.0), (1.0, 3.0), (2.0, 3.0)]


def test_an_ocr_run_reports_its_lines_confidence_and_words(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    img, _ = ocr.render(7)
    cv2.imwrite(str(d / "page.png"), img)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    cli("ocr_images.py", "--input", str(d / "*"), "--output", str(out), "--runner=EdgeRunner")
    report = (out / REPORT).read_text()
    t = totals(report)
    assert (t["inputs"], t["scored"], t["dead letters"]) == ("2", "1", "1")
    assert "ppocrv4_det:1" in t["model"] and "ppocrv4_rec:1" in t["model"]
    lines = read(out)[0]["lines"]
    assert lines and f"{len(lines)} lines read on 1 pages" in report and "Confidence of the lines read" in report
    for word in {w for line in lines for w in line["text"].split()}:
        assert f"<title>{html.escape(word)}</title>" in report
    assert "ocr/decode" in report and "ocr/detect (" in report


# ---------------------------------------------------------------- in a browser

@pytest.fixture(scope="module")
def chromium():
    return debian_tool("chromium")


def browse(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=120)


def test_chromium_draws_every_chart(runs, chromium, tmp_path):
    url = (runs["bad"] / REPORT).as_uri()
    dom = browse(chromium, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url).stdout
    drawn = re.findall(r'data-chart="(\w+)"[^>]*data-rendered="(\d+) marks (\d+)x(\d+)"', dom)
    assert {name for name, *_ in drawn} == {"over_time", "steps", "dead_by_stage", "scores", "commonest"}, dom[-2000:]
    assert all(int(n) > 0 and int(w) > 100 and int(h) > 10 for _, n, w, h in drawn), drawn
    assert 'data-charts="5 of 5 drawn"' in dom

    png = tmp_path / "report.png"
    browse(chromium, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=900,2400", url)
    img = cv2.imread(str(png))
    assert img is not None, "chromium wrote no screenshot"
    bar_blue = np.all(np.abs(img.astype(int) - (0xb0, 0x6c, 0x2b)) < 12, axis=2)  # BGR of the bars' blue
    dead_red = np.all(np.abs(img.astype(int) - (0x30, 0x30, 0xc5)) < 12, axis=2)
    assert bar_blue.sum() > 2000 and dead_red.sum() > 500

"""OCR with the PP-OCRv4 models of the rapidocr-onnxruntime wheel: the models and their
pins, the steps' rules, character error rate on rendered pages and a photographed page,
the same lines as RapidOCR's own engine, and the same rows on every runner."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

import ocr_support as ocr
from beamzoo import zoo
from beamzoo.samples import make_sample_set
from beamzoo.transforms.ocr import CropText, DetectText, RecognizeText, TextLines
from beamzoo.transforms.ocr import ctc
from beamzoo.transforms.ocr.db import unclip
from beamzoo.transforms.ocr.detect import pad_ratios
from beamzoo.transforms.ocr.crop import rectify
from beamzoo.transforms.ocr.images import image_struct, pixels
from beamzoo.transforms.ocr.lines import reading_order
from beamzoo.ocr import ocr_images
from beamzoo.imaging import decode
from beamzoo.zoo import rapidocr
from conftest import ROOT, assert_same_rows, read, run_graph

pytestmark = pytest.mark.integration

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
# skimage/data/page.png, a photograph of a printed page, as it reads (every line in view)
PAGE = ["Region-based segmentation",
        "Let us first determine markers of the coins and the",
        "background. These markers are pixels that we can label",
        "unambiguously as either object or background. Here,",
        "the markers are found at the two extreme parts of the",
        "histogram of grey values:",
        ">>> markers = np.zeros_like(coins)"]
CARDS = {"ppocrv4_det:1": ("text-detection", "ch_PP-OCRv4_det_infer.onnx"),
         "ppocrv4_rec:1": ("text-recognition", "ch_PP-OCRv4_rec_infer.onnx"),
         "ppocr_cls:1": ("text-direction", "ch_ppocr_mobile_v2.0_cls_infer.onnx")}
SEEDS = range(30)
TURNED = range(100, 104)  # pages upside down: the angle classifier turns their lines


# ---------------------------------------------------------------- models

def test_each_card_builds_its_pinned_file_from_the_wheel():
    for ref, (task, file) in CARDS.items():
        card = zoo.get(ref)
        assert card.task == task and card.build == {"builder": "rapidocr", "args": {"file": file}}
        data = zoo.model_bytes(card)
        assert hashlib.sha256(data).hexdigest() == card.sha256 == rapidocr.FILES[file]
        assert rapidocr.build_rapidocr(file) == data  # deterministic
    assert zoo.get("ppocr_cls:1").labels == ("0", "180")


def test_the_recognizers_dictionary_is_in_its_metadata_and_fits_its_classes():
    from beamzoo.transforms.ocr.models import RECOGNIZER, characters, session
    sess = session(RecognizeText(), zoo.get(RECOGNIZER))
    chars = characters(sess)
    assert chars[0] == "" and chars[-1] == " " and len(chars) == 6625 == sess.get_outputs()[0].shape[-1]
    assert {"A", "z", "0", "9", "%", "."} <= set(chars)


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_none_is_fetched_when_it_is_there(
        tmp_path, monkeypatch):
    source = rapidocr.wheel_path()  # the real one, in the real cache
    monkeypatch.setenv("BEAMZOO_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "wheels" / rapidocr.WHEEL).write_bytes(bytes(data))

    def no_download(dest):
        raise AssertionError("the wheel is in the cache: nothing may be downloaded")
    monkeypatch.setattr(rapidocr, "_download", no_download)
    with pytest.raises(rapidocr.RapidOcrWheelError, match="not the pinned 971d7d5f"):
        rapidocr.build_rapidocr("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    shutil.copyfile(source, tmp_path / "wheels" / rapidocr.WHEEL)
    assert hashlib.sha256(rapidocr.build_rapidocr("ch_ppocr_mobile_v2.0_cls_infer.onnx")).hexdigest() == \
        rapidocr.FILES["ch_ppocr_mobile_v2.0_cls_infer.onnx"]
    with pytest.raises(ValueError, match="no model 'nope.onnx' in rapidocr_onnxruntime-1.4.4"):
        rapidocr.build_rapidocr("nope.onnx")


def test_a_step_refuses_a_model_for_another_task():
    with pytest.raises(ValueError, match="model ppocrv4_det:1 is for text-detection, not text-recognition"):
        RecognizeText(model="ppocrv4_det:1")
    with pytest.raises(zoo.UnknownModel, match="no model named 'nope'"):
        DetectText(model="nope:1")


# ---------------------------------------------------------------- the steps' rules

def test_unclip_grows_a_box_by_area_times_ratio_over_perimeter():
    pyclipper = pytest.importorskip("pyclipper")
    rng = np.random.default_rng(7)
    for _ in range(300):
        rect = ((rng.uniform(20, 500), rng.uniform(20, 500)), (rng.uniform(3, 300), rng.uniform(3, 60)),
                rng.uniform(-90, 90))
        quad = cv2.boxPoints(rect).astype(np.float32)
        w, h = rect[1]
        offset = pyclipper.PyclipperOffset()  # the polygon clipper RapidOCR uses, as the reference
        offset.AddPath(quad, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        theirs = np.array(offset.Execute(w * h * 1.6 / (2 * (w + h)))).reshape(-1, 1, 2)
        ours = unclip(quad, 1.6).reshape(-1, 1, 2)
        assert np.allclose(cv2.boxPoints(cv2.minAreaRect(ours)), cv2.boxPoints(cv2.minAreaRect(theirs)))


def test_regions_of_an_image_share_the_width_of_their_group():
    assert pad_ratios([1.0, 9.0, 2.0, 4.0, 3.0], 2) == [2.0, 9.0, 2.0, 4.0, 4.0]  # groups 1,2 | 3,4 | 9
    assert pad_ratios([], 6) == []


def test_reading_order_is_rows_top_to_bottom_each_left_to_right():
    def box(x, y, w=40, h=20):
        return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]
    boxes = [box(200, 52), box(10, 50), box(10, 100), box(120, 45), box(10, 160, h=30)]
    assert reading_order(boxes) == [[1, 3, 0], [2], [4]]
    op = TextLines(min_score=0.5)
    row = {"region_text": ["c", "a", "d", "b", "noise"], "region_score": [0.9, 0.9, 0.8, 0.7, 0.2],
           "region_box": boxes}
    out = op.process_row(row)
    assert out["text"] == "a b c\nd" and [line["text"] for line in out["lines"]] == ["a", "b", "c", "d"]


def test_a_region_that_cannot_be_cropped_or_recognized_is_a_dead_letter_of_its_own():
    patch = image_struct(np.full((30, 90, 3), 255, np.uint8))
    quads = [[[2, 2], [80, 2], [80, 25], [2, 25]], [[5, 5], [5, 5], [5, 5], [5, 5]],
             [[1, 1], [float("nan"), 1], [3, 3], [1, 3]]]
    batch = pa.RecordBatch.from_pylist(
        [{"id": f"img#{i}", "parent_id": "img", "patch": patch, "quad": q} for i, q in enumerate(quads)],
        schema=pa.schema([pa.field("id", pa.string()), pa.field("parent_id", pa.string()),
                          CropText.requires.field("patch"), CropText.requires.field("quad")]))
    ok, dead = CropText().process(batch)
    assert ok.column("id").to_pylist() == ["img#0"]
    assert dead.column("id").to_pylist() == ["img#1", "img#2"] and set(dead.column("parent_id").to_pylist()) == {"img"}
    assert "has no area" in dead.column("error")[0].as_py() and "four finite corners" in dead.column("error")[1].as_py()
    ok, dead = CropText(max_ratio=2).process(batch.slice(0, 1))
    assert ok.num_rows == 0 and "longer than max_ratio=2" in dead.column("error")[0].as_py()
    empty = pa.RecordBatch.from_pylist(
        [{"id": "img#0", "parent_id": "img", "image": image_struct(np.zeros((0, 5, 3), np.uint8)), "pad_ratio": 1.0}],
        schema=pa.schema([pa.field("id", pa.string()), pa.field("parent_id", pa.string()),
                          *RecognizeText.requires]))
    ok, dead = RecognizeText().process(empty)
    assert ok.num_rows == 0 and dead.column("parent_id").to_pylist() == ["img"]
    assert dead.column("stage").to_pylist() == ["recognize"]


def test_a_space_goes_where_the_model_half_reads_one_between_two_characters():
    steps = 16

    def spaced(text, starts, space_at=(), ends=None, **knobs):
        p = np.zeros(steps, np.float32)
        for step, prob in space_at:
            p[step] = prob
        return ctc.add_spaces(list(text), starts, starts if ends is None else ends, p, **knobs)
    even = [0, 4, 8, 12]
    assert spaced("abcd", even) == "abcd"
    assert spaced("abcd", even, [(6, 0.02)]) == "ab cd"
    assert spaced("abcd", even, [(6, 0.005)]) == "abcd"  # unsure, and no wider apart than the others
    wide = [0, 4, 8, 14]  # c and d 6 steps apart, 1.5 times the median distance
    assert spaced("abcd", wide, [(11, 0.005)]) == "abc d"
    assert spaced("abcd", wide, [(11, 0.002)]) == "abcd"  # under a quarter of space_prob
    assert spaced("abcd", wide) == "abcd"  # the distance alone is no space
    assert spaced("abcd", wide, [(11, 0.005)], space_gap=2.0) == "abcd"
    assert spaced("abcd", even, [(6, 0.02)], space_prob=0.05) == "abcd"
    assert spaced("abcd", even, [(2, 0.5)], ends=[3, 4, 8, 12]) == "abcd"  # inside a's run, not between
    assert spaced("ab cd", [0, 4, 6, 8, 12], [(5, 0.9), (7, 0.9)]) == "ab cd"  # the model's space, not doubled
    assert spaced("中文a", [0, 4, 8], [(2, 0.5), (6, 0.5)]) == "中文 a"  # never between two wide characters
    assert spaced("a", [3], [(5, 0.9)]) == "a"


def test_decoding_only_adds_spaces_to_what_greedy_decoding_reads():
    chars = ["", "a", "b", "7", "中", " "]
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (300, 24, len(chars))).astype(np.float32)
    logits[:, :, 0] += rng.choice([0, 4], (300, 24))  # mostly blanks, as a recognizer's output is
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    spaced, plain = ctc.decode(probs, chars), ctc.decode(probs, chars, space_prob=1.0)
    added = 0
    for (a, score_a), (b, score_b) in zip(spaced, plain):
        assert score_a == score_b and a.replace(" ", "") == b.replace(" ", "") and only_spaces_added(b, a), (a, b)
        assert a.count("  ") == b.count("  ") and a == a.strip()  # no space doubled, none at the ends
        added += a.count(" ") - b.count(" ")
    assert added > 50  # random outputs hold many half-read spaces
    one = np.full((1, 9, len(chars)), 0.001, np.float32)
    one[0, :, 0] = 0.99
    for step, c in ((1, 1), (2, 1), (6, 2)):  # "a" (two steps), "b"
        one[0, step] = 0.001
        one[0, step, c] = 0.99
    one[0, 4, 5] = 0.05
    assert ctc.decode(one, chars) == [("a b", pytest.approx(0.99))]
    assert ctc.decode(one, chars, space_prob=1.0) == [("ab", pytest.approx(0.99))]
    one[0, [0, 8], 0], one[0, [0, 8], 5] = 0.001, 0.99  # spaces read at the ends are dropped
    assert ctc.decode(one, chars)[0][0] == "a b" and ctc.decode(one, chars[:-1] + ["x"])[0][0] == "xabx"


def only_spaces_added(before: str, after: str) -> bool:
    """Whether ``after`` is ``before`` with spaces inserted."""
    i = 0
    for ch in after:
        if i < len(before) and ch == before[i]:
            i += 1
        elif ch != " ":
            return False
    return i == len(before)


def test_on_rendered_pages_the_recognizer_puts_back_the_spaces_it_drops_and_reads_the_same_characters():
    detect, regions, pages = DetectText().bind(), [], []
    for seed in SEEDS:  # the pages the pipeline reads below, cut into regions as it cuts them
        img, lines = ocr.render(seed)
        found = detect.regions(img)
        regions += [(len(pages), r["box"], rectify(pixels(r["patch"]), r["quad"]), r["pad_ratio"]) for r in found]
        pages.append(lines)
    batch = pa.RecordBatch.from_pylist(
        [{"id": f"region{i}", "image": image_struct(crop), "pad_ratio": pad}
         for i, (_, _, crop, pad) in enumerate(regions)],
        schema=pa.schema([pa.field("id", pa.string()), *RecognizeText.requires]))
    spaced, plain = (RecognizeText(space_prob=p).process(batch).ok.to_pylist() for p in (ctc.SPACE_PROB, 1.0))
    assert len(spaced) == len(plain) == len(regions)
    assert all(only_spaces_added(b["text"], a["text"]) for a, b in zip(spaced, plain)), \
        [(a["text"], b["text"]) for a, b in zip(spaced, plain)]

    def error_rate(read):
        texts = [[] for _ in pages]
        for (page, box, _, _), r in zip(regions, read):
            texts[page].append((r["text"], r["score"], box))
        return np.mean([ocr.cer(TextLines().process_row(
            {"region_text": [t for t, _, _ in ts], "region_score": [s for _, s, _ in ts],
             "region_box": [b for _, _, b in ts]})["text"].split("\n"), lines) for ts, lines in zip(texts, pages)])
    with_spaces, before = error_rate(spaced), error_rate(plain)
    print(f"CER of {len(pages)} pages {with_spaces:.4f}, without putting spaces back {before:.4f}")
    assert with_spaces <= 0.01 and before > 0.03  # the spaces it drops were most of its errors


# ---------------------------------------------------------------- accuracy

@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Rendered pages (and some upside down), the photographed page, the sample photographs
    (mostly no text), a blank image and a broken file; and the text drawn on each page."""
    d = tmp_path_factory.mktemp("ocr_pages")
    truth = ocr.write_images(d, SEEDS)
    for seed in TURNED:
        img, lines = ocr.render(seed, angle=180)
        cv2.imwrite(str(d / f"turned{seed}.png"), img)
        truth[f"turned{seed}.png"] = lines
    for name in ("page.png", "text.png"):
        shutil.copyfile(SKIMAGE_DATA / name, d / name)
    truth["page.png"] = PAGE
    make_sample_set(d)
    cv2.imwrite(str(d / "blank.png"), np.full((120, 200, 3), 250, np.uint8))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d, truth


@pytest.fixture(scope="module")
def read_pages(pages, tmp_path_factory):
    d, truth = pages
    out = tmp_path_factory.mktemp("ocr_out")
    stats = run_graph(ocr_images(str(d / "*"), str(out)), "EdgeRunner")
    return {os.path.basename(r["path"]): r for r in read(out)}, read(out, "dead_letter"), stats


def test_every_image_gives_a_row_or_a_dead_letter_and_one_without_text_an_empty_text(pages, read_pages):
    d, _ = pages
    rows, dead, stats = read_pages
    assert sorted([*rows, *(os.path.basename(x["source"]) for x in dead if x["parent_id"] is None)]) == \
        sorted(os.listdir(d))
    assert [os.path.basename(x["source"]) for x in dead] == ["broken.png"] and stats.inputs == len(os.listdir(d))
    assert rows["blank.png"]["text"] == "" and rows["blank.png"]["lines"] == [] and rows["blank.png"]["children"] == 0
    assert sum(r["text"] == "" for r in rows.values()) >= 5  # most sample photographs have no text


def test_character_error_rate_on_rendered_pages_of_several_fonts_and_backgrounds(pages, read_pages):
    _, truth = pages
    rows, _, _ = read_pages
    by_font, by_background, spaceless = {}, {}, []
    for seed in SEEDS:
        name = f"page{seed:05d}.png"
        lines = rows[name]["text"].split("\n")
        rng = np.random.default_rng(seed)  # the font and background render() picked
        font = ocr.FONTS[int(rng.integers(len(ocr.FONTS)))]
        background = ("plain", "dark", "gradient", "noise")[int(rng.integers(4))]
        by_font.setdefault(font, []).append(ocr.cer(lines, truth[name]))
        by_background.setdefault(background, []).append(ocr.cer(lines, truth[name]))
        spaceless.append(ocr.cer([t.replace(" ", "") for t in lines], [t.replace(" ", "") for t in truth[name]]))
    assert set(by_font) == set(ocr.FONTS) and len(by_background) == 4
    every = [c for cs in by_font.values() for c in cs]
    print("CER by font", {k: round(float(np.mean(v)), 4) for k, v in by_font.items()},
          "by background", {k: round(float(np.mean(v)), 4) for k, v in by_background.items()},
          f"all {np.mean(every):.4f}, without spaces {np.mean(spaceless):.4f}")
    assert np.mean(every) <= 0.01 and np.mean(spaceless) < 0.005
    assert all(np.mean(v) < 0.03 for v in by_font.values())


def test_upside_down_pages_are_read_after_the_angle_classifier_turns_their_lines(pages, read_pages):
    _, truth = pages
    rows, _, _ = read_pages
    errors = [ocr.cer([t.replace(" ", "") for t in reversed(rows[f"turned{s}.png"]["text"].split("\n"))],
                      [t.replace(" ", "") for t in truth[f"turned{s}.png"]]) for s in TURNED]
    assert np.mean(errors) < 0.05, errors


def test_character_error_rate_on_a_photographed_page(read_pages):
    rows, _, _ = read_pages
    got = rows["page.png"]["text"].split("\n")
    rate = ocr.cer(got, PAGE)
    # the lines it finds, each against the line of the page it is closest to, spaces aside
    found = [min(ocr.cer([g.replace(" ", "")], [t.replace(" ", "")]) for t in PAGE) for g in got]
    print(f"page.png CER {rate:.3f} ({len(got)} of {len(PAGE)} lines found; their CER without spaces "
          f"{np.mean(found):.4f}): {got}")
    assert rate < 0.35 and len(got) >= 5 and np.mean(found) < 0.02


def test_the_same_lines_as_rapidocrs_engine_for_at_least_99_percent_and_the_spaces_it_drops(pages, read_pages):
    d, truth = pages
    rows, _, _ = read_pages
    engine = ocr.rapidocr_engine()
    alike = compared = 0
    differ, ours, theirs = [], [], []
    for name, row in sorted(rows.items()):
        img = decode((d / name).read_bytes(), 100_000_000, None, "BGR")  # the pixels beamzoo read
        result = engine(img)[0] or ()
        lines = [line["text"] for line in row["lines"]]
        a, n = ocr.same_lines([t.replace(" ", "") for t in lines], [r[1].replace(" ", "") for r in result])
        alike, compared = alike + a, compared + n
        if a != n:
            differ.append((name, lines, [r[1] for r in result]))
        if name.startswith("page0"):  # rendered upright: their lines in reading order, as TextLines puts ours
            rapid = TextLines().process_row({"region_text": [r[1] for r in result], "region_box": [r[0] for r in result],
                                             "region_score": [r[2] for r in result]})["text"]
            ours.append(ocr.cer(row["text"].split("\n"), truth[name]))
            theirs.append(ocr.cer(rapid.split("\n"), truth[name]))
    print(f"lines alike, spaces aside: {alike} of {compared}", differ,
          f"CER on rendered pages: beamzoo {np.mean(ours):.4f}, RapidOCR {np.mean(theirs):.4f}")
    assert compared >= 90 and alike >= 0.99 * compared, differ
    assert len(ours) == len(SEEDS) and np.mean(ours) <= 0.01 and np.mean(theirs) > 3 * np.mean(ours)


# ---------------------------------------------------------------- runners

@pytest.fixture(scope="module")
def few(tmp_path_factory):
    d = tmp_path_factory.mktemp("ocr_few")
    ocr.write_images(d, range(3))
    cv2.imwrite(str(d / "blank.png"), np.full((80, 120, 3), 255, np.uint8))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return d


def test_the_same_rows_on_every_runner_and_each_region_accounted_for(tmp_path, few, any_runner):
    # max_ratio=5: long lines are refused by the crop step, each a dead letter of its own
    def graph(out):
        return ocr_images(str(few / "*"), str(out), max_ratio=5.0, min_score=0.0)
    run_graph(graph(tmp_path / "edge"), "EdgeRunner")
    run_graph(graph(tmp_path / "this"), any_runner)
    rows, dead = read(tmp_path / "this"), read(tmp_path / "this", "dead_letter")
    assert_same_rows(rows, read(tmp_path / "edge"))
    assert_same_rows(dead, read(tmp_path / "edge", "dead_letter"))
    assert [os.path.basename(x["source"]) for x in dead if x["parent_id"] is None] == ["broken.jpg"]
    died = Counter(x["parent_id"] for x in dead if x["parent_id"] is not None)
    assert died and all(x["stage"] == "ocr/crop" and "max_ratio=5" in x["error"] for x in dead if x["parent_id"])
    for r in rows:
        assert r["children"] == len(r["lines"]) + died[r["id"]]
    assert {os.path.basename(r["path"]): r["text"] for r in rows}["blank.png"] == ""


def test_the_command_line_job(tmp_path, few):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "ocr_images.py"), "--input", str(few / "*"),
           "--output", str(out), "--runner=EdgeRunner", "--no_progress"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([*cmd, "--profile", str(tmp_path / "p.json")], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inputs: 5  scored: 4  dead letters: 1" in done.stdout
    rows = read(out)
    assert set(rows[0]) >= {"id", "path", "text", "lines", "children"} and any(r["text"] for r in rows)
    steps = json.loads((tmp_path / "p.json").read_text())["steps"]  # every step, the one-to-many too
    regions = steps["ocr/detect"]["ports"]["out"]
    assert steps["ocr/detect"]["rows_in"] == 4 and regions == steps["ocr/crop"]["rows_in"] > 0
    assert steps["ocr/collect_lines"]["rows_out"] == 4 and steps["ocr/collect_lines"]["ports"]["children"] > 0
    bad = subprocess.run([*cmd[:-2], "--min_score", "1.5"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "--min_score: must be between 0 and 1, got 1.5" in bad.stderr

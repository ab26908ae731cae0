"""Every intermediate of OCR is bounded: the detector's input on both sides whatever the
image's shape, the recognizer's input width, the patches of one image, and the pixels a
batch holds in bytes (decoded images are handed on in pieces, never past Arrow's 2 GiB)."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pyarrow as pa
import pytest

import ocr_support as ocr
from beamzoo.core.context import RunContext
from beamzoo.core.kernels import run_map, run_ports
from beamzoo.transforms import flow
from beamzoo.transforms.flow import Tiles
from beamzoo.transforms.ocr import RecognizeText
from beamzoo.transforms.ocr.geometry import MAX_ASPECT, detector_input, fit
from beamzoo.transforms.preprocess import DecodeImage
from conftest import ROOT, paths_batch, read

# the tall one first: before the bound it alone made a 46000 x 736 input
SHAPES = [(20000, 1), (46000, 32), (1, 20000), (1999, 1), (1, 1999), (2, 3), (9000, 9000 // 200),
          (3000, 2000), (64, 4000), (720, 1280)]


@pytest.mark.parametrize("h, w", SHAPES)
def test_the_detectors_input_is_bounded_on_both_sides_whatever_the_images_shape(h, w):
    fitted = fit(np.zeros((h, w, 3), np.uint8))
    assert max(fitted.image.shape[:2]) <= 2000 + 32, fitted.image.shape  # max_side, to a multiple of 32
    x = detector_input(fitted.image, 736)
    _, _, nh, nw = x.shape
    assert max(nh, nw) <= max(2000 + 32, MAX_ASPECT * 736) and min(nh, nw) >= 32, (h, w, x.shape)
    assert nh % 32 == 0 and nw % 32 == 0
    if min(fitted.image.shape[:2]) >= 736 or max(fitted.image.shape[:2]) * 736 / min(fitted.image.shape[:2]) \
            <= MAX_ASPECT * 736:
        assert min(nh, nw) >= 736 - 32  # an ordinary image keeps its short side at limit_side


def test_the_recognizers_input_is_at_most_256_heights_wide():
    img = np.full((48, 96, 3), 200, np.uint8)
    row = {"image": {"data": img.tobytes(), "height": 48, "width": 96, "channels": 3}, "pad_ratio": 100000.0}
    _, width = RecognizeText().prepare(row)
    assert width == 48 * 256


def _pngs(d, sizes):
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = os.path.join(d, f"{i}.png")
        cv2.imwrite(p, np.full((h, w, 3), 40 * i, np.uint8))
        paths.append(p)
    return paths


def _read(paths):
    batch = paths_batch(paths)
    data = [open(p, "rb").read() for p in paths]
    return batch.append_column("data", pa.array(data, pa.binary()))


@pytest.mark.parametrize("isolate", [False, True])
def test_images_are_decoded_in_pieces_bounded_by_their_pixels_not_their_files(tmp_path, isolate):
    paths = _pngs(tmp_path, [(100, 100)] * 5)  # each 30,000 bytes of pixels, a few hundred of file
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(2, str(tmp_path / "broken.png"))
    op = DecodeImage(batch_bytes=70_000, isolate=isolate).bind(RunContext())
    pieces = list(op.process_pieces(_read(paths)))
    assert [p.ok.num_rows for p in pieces] == [2, 2, 1]  # the broken file counts nothing, dies in its piece
    assert all(sum(len(v["data"]) for v in p.ok.column("image").to_pylist()) <= 70_000 for p in pieces)
    assert [r for p in pieces for r in p.ok.column("path").to_pylist()] == [x for x in paths if "broken" not in x]
    assert [r for p in pieces for r in p.dead.column("source").to_pylist()] == [paths[2]]
    # a kernel hands each piece through the rest of its stage before the next is made
    seen = []
    outs = list(run_map([op, _Spy(seen)], _read(paths), RunContext()))
    assert seen == [2, 2, 1] and sum(b.num_rows for port, b in outs if port == "out") == 5


class _Spy(flow.Drop):
    """Records the size of each batch it sees."""

    def __init__(self, seen):
        super().__init__(fields=[])
        self.seen = seen

    def process(self, batch):
        self.seen.append(batch.num_rows)
        return super().process(batch)


def test_a_one_to_many_step_hands_its_children_on_in_pieces_by_bytes(tmp_path, monkeypatch):
    paths = _pngs(tmp_path, [(60, 60)] * 4)  # four tiles of 2,700 bytes each per image
    batch = DecodeImage(isolate=False).bind(RunContext()).process(_read(paths)).ok
    monkeypatch.setattr(flow, "PIECE_BYTES", 15_000)
    ctx = RunContext()
    outs = list(run_ports(Tiles(rows=2, cols=2), batch, ctx))
    children = [b.num_rows for port, b in outs if port == "out"]
    assert children == [8, 8]  # two images' tiles a piece: 21,600 bytes, then the next two
    assert sum(b.num_rows for port, b in outs if port == "parents") == 4
    step = ctx.steps["tiles"]
    assert (step.rows_in, step.rows_out, step.ports["out"], step.ports["parents"]) == (4, 4, 16, 4)


def _ocr_in_a_process(tmp_path, images) -> tuple[subprocess.CompletedProcess, int]:
    """The OCR job on ``images`` in a process of its own, and the largest resident set (KiB) of
    that process and of its decode workers."""
    out = tmp_path / "out"
    code = ("import sys; from beamzoo.ocr import ocr_images; from beamzoo.pipeline import run; "
            "from beamzoo.runners.edge import EdgeRunner; "
            "s = run(ocr_images(sys.argv[1], sys.argv[2]), 'EdgeRunner', "
            "edge=EdgeRunner(workers=2, chunk_size=16, progress=False)); print(s.inputs, s.failed)")
    # a fresh parent measures it: this process's own children's peak counts every test run before
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", measure, sys.executable, "-c", code, str(images / "*"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=900)
    last = done.stderr.strip().rsplit("\n", 1)[-1]
    return done, int(last) if last.isdigit() else 0


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_files_of_extreme_shapes_are_read_in_bounded_memory(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for i, (h, w) in enumerate([(1, 1999), (20000, 1), (1, 30000), (3, 12000)]):
        cv2.imwrite(str(images / f"sliver{i}.png"), np.full((h, w, 3), 255, np.uint8))  # a few KiB at most
        assert os.path.getsize(images / f"sliver{i}.png") < 20_000
    img, lines = ocr.render(3)
    cv2.imwrite(str(images / "page.png"), img)
    done, peak = _ocr_in_a_process(tmp_path, images)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {os.path.basename(r["path"]): r for r in read(tmp_path / "out")}
    assert len(rows) == 5 and rows["page.png"]["text"]
    # the models and Python take a few hundred MiB; unbounded, these slivers took gigabytes
    assert 0 < peak < 1_500_000, f"peak resident set {peak} KiB"


@pytest.mark.integration
@pytest.mark.slow
def test_a_batch_of_pages_whose_pixels_pass_2_gib_is_read_whole(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    page = np.full((10000, 10000, 3), 250, np.uint8)  # 100 megapixels: the default max_pixels
    cv2.putText(page, "bounded", (400, 5000), cv2.FONT_HERSHEY_SIMPLEX, 40, (0, 0, 0), 80)
    ok, jpeg = cv2.imencode(".jpg", page)
    del page
    for i in range(8):  # one batch of 8 x 300 MB of pixels
        (images / f"page{i}.jpg").write_bytes(jpeg.tobytes())
    done, peak = _ocr_in_a_process(tmp_path, images)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["8", "0"], done.stdout  # 8 inputs, no dead letter
    rows = read(tmp_path / "out")
    assert len(rows) == 8 and all("bounded" in r["text"].lower() for r in rows), [r["text"] for r in rows]
    # bounded by the workers (each with a page or two in hand), not by the batch: about 4 GiB here
    assert 0 < peak < 6_000_000, f"peak resident set {peak} KiB"

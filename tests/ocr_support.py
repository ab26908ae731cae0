"""For the OCR tests and bench/ocr.py: images of known text rendered with OpenCV
and Pillow, character error rate, and RapidOCR's own engine to compare with."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("invoice total amount paid order number date shipping address street city river garden "
         "morning station coffee window market yellow purple seven twelve hundred north south "
         "Berlin Paris London Tokyo Model Serial Batch Print Label Price Quantity Report Summary "
         "2024 1987 42 305 7781 19.99 3.50 100% A-17 B52 X9").split()
HERSHEY = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
           cv2.FONT_HERSHEY_TRIPLEX)
FONTS = ("simplex", "duplex", "complex", "triplex", "pillow")  # Pillow: its built-in scalable font


def _background(rng, h: int, w: int, kind: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(BGR background, text colour)."""
    if kind == "plain":
        return np.full((h, w, 3), rng.integers(215, 256), np.uint8), (int(rng.integers(0, 60)),) * 3
    if kind == "dark":
        return np.full((h, w, 3), (60, 30, 20), np.uint8), (235, 235, 235)
    if kind == "gradient":
        ramp = np.linspace(170, 255, w, dtype=np.float32)[None, :, None]
        return np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8).copy(), (90, 20, 20)
    noise = rng.normal(225, 12, (h, w, 1)).clip(0, 255).astype(np.uint8)  # "noise"
    return np.repeat(noise, 3, axis=2), (20, 20, 20)


def _draw(img: np.ndarray, text: str, x: int, y: int, font: str, size: int, colour) -> None:
    """``text`` with its top-left corner near (x, y), ``size`` pixels high."""
    if font == "pillow":
        pil = Image.fromarray(img[:, :, ::-1])
        ImageDraw.Draw(pil).text((x, y), text, fill=tuple(colour[::-1]), font=ImageFont.load_default(size))
        img[:] = np.asarray(pil)[:, :, ::-1]
        return
    face = HERSHEY[FONTS.index(font)]
    scale = cv2.getFontScaleFromHeight(face, size, 2)
    cv2.putText(img, text, (x, y + size), face, scale, colour, 2, cv2.LINE_AA)


def render(seed: int, font: str | None = None, background: str | None = None,
           angle: float | None = None) -> tuple[np.ndarray, list[str]]:
    """A BGR page of 1-4 lines of words, and those lines (top to bottom)."""
    rng = np.random.default_rng(seed)
    font = font or FONTS[int(rng.integers(len(FONTS)))]
    background = background or ("plain", "dark", "gradient", "noise")[int(rng.integers(4))]
    size = int(rng.integers(18, 44))
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 5)))]
    width = max(320, int(max(len(t) for t in lines) * size * 0.75) + 60)
    height = int(len(lines) * size * 2.2) + 60
    img, colour = _background(rng, height, width, background)
    for k, text in enumerate(lines):
        _draw(img, text, 30, 30 + int(k * size * 2.2), font, size, colour)
    angle = float(rng.uniform(-6, 6)) if angle is None else angle
    if angle:
        m = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        img = cv2.warpAffine(img, m, (width, height), borderMode=cv2.BORDER_REPLICATE)
    return img, lines


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(predicted: list[str], truth: list[str]) -> float:
    """Character error rate of the text read against the text drawn (lines joined)."""
    want = "\n".join(truth)
    return edit_distance("\n".join(predicted), want) / max(1, len(want))


def rapidocr_engine():
    """RapidOCR's own engine from the pinned wheel (headless OpenCV stands in for
    opencv-python), with its default settings."""
    from beamzoo.zoo.rapidocr import engine_dir
    path = str(engine_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    from rapidocr_onnxruntime import RapidOCR
    return RapidOCR()


def rapidocr_lines(engine, img: np.ndarray) -> list[str]:
    """The lines RapidOCR reads in a BGR image (its order)."""
    result, _ = engine(img)
    return [r[1] for r in result or ()]


def same_lines(ours: list[str], theirs: list[str]) -> tuple[int, int]:
    """(lines read alike, lines compared): each line of either side is matched to an
    equal line of the other at most once; an unmatched one counts as a difference."""
    left = list(theirs)
    alike = 0
    for t in ours:
        if t in left:
            left.remove(t)
            alike += 1
    return alike, max(len(ours), len(theirs))


def write_images(directory: Path, seeds) -> dict[str, list[str]]:
    """Rendered pages as PNG files in ``directory``; file name -> the lines drawn."""
    directory.mkdir(parents=True, exist_ok=True)
    truth = {}
    for seed in seeds:
        img, lines = render(seed)
        name = f"page{seed:05d}.png"
        cv2.imwrite(str(directory / name), img)
        truth[name] = lines
    return truth

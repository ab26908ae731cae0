"""Odd and broken image files, made from a real photograph.

Each maker writes one file and returns its path; ``EXPECTED`` says whether it
must be scored ("ok") or dead-lettered (the stage that refuses it).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from beamzoo.samples import sample_path


def photo() -> np.ndarray:
    """chelsea.png as BGR uint8, 300x451."""
    return cv2.imread(str(sample_path("chelsea.png")))


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def exif_rotated_jpeg(path: Path) -> None:
    """A landscape photo stored with EXIF orientation 6 (display rotated 90 degrees)."""
    rgb = cv2.cvtColor(photo(), cv2.COLOR_BGR2RGB)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, "JPEG", exif=exif.tobytes(), quality=90)


def make_all(d: Path, big_side: int = 1200) -> dict[str, str]:
    """Write every case into ``d``; returns {file name: expected outcome}."""
    d.mkdir(parents=True, exist_ok=True)
    img = photo()
    cv2.imwrite(str(d / "good.jpg"), img)
    cv2.imwrite(str(d / "good.png"), img)
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is a text file, not a JPEG\n")
    jpg = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    cv2.imwrite(str(d / "deep16.png"), img.astype(np.uint16) * 257)
    cv2.imwrite(str(d / "gray.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(d / "rgba.png"), cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
    exif_rotated_jpeg(d / "exif_rotated.jpg")
    cv2.imwrite(str(d / "large.jpg"), cv2.resize(img, (big_side * 3 // 2, big_side)))
    (d / "bomb.png").write_bytes(png_bomb(20000, 20000))
    return dict(EXPECTED)


EXPECTED = {
    "good.jpg": "ok", "good.png": "ok", "deep16.png": "ok", "gray.png": "ok", "rgba.png": "ok",
    "exif_rotated.jpg": "ok", "large.jpg": "ok",
    "empty.jpg": "read", "text.jpg": "decode", "truncated.jpg": "decode",
    "truncated.png": "decode", "bomb.png": "decode",
}

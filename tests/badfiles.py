"""Odd and broken image files, made from a real photograph.

Each maker writes one file and returns its path; ``EXPECTED`` says whether it
must be scored ("ok") or dead-lettered (the stage that refuses it).
"""
from __future__ import annotations

import io
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


def jpeg_many_scans(scans: int, size=(4000, 3000)) -> bytes:
    """A progressive grey JPEG followed by ``scans`` extra AC scans that only say "every
    block is empty": a few bytes each, yet the decoder walks every block for each one."""
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    blocks = -(-size[0] // 8) * -(-size[1] // 8)
    # AC table 1 with one code, "0", for EOB14 (a run of 2^14 + 14 more bits of empty blocks)
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 17 + 1) + b"\x11" + b"\x01" + b"\x00" * 15 + b"\xe0"
    bits = ("0" + format(32767 - (1 << 14), "014b")) * -(-blocks // 32767)  # runs of 32767 (the last may overshoot)
    bits += "1" * (-len(bits) % 8)
    body = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x01, 1, 63, 0x00)
    end = data.rindex(b"\xff\xd9")
    return data[:end] + dht + (sos + body) * scans + data[end:]


def tiff_lying_size(width: int, height: int, fake_width: int, fake_height: int) -> bytes:
    """An RGB TIFF of width x height (one deflated strip) whose width and height tags come
    twice: Pillow keeps the second pair (fake), libtiff the first (real)."""
    strip = zlib.compress(b"\0" * (width * 3 * height), 9)
    tags = [(256, 4, width), (256, 4, fake_width), (257, 4, height), (257, 4, fake_height), (258, 3, 8),
            (259, 3, 8), (262, 3, 2), (273, 4, 0), (277, 3, 3), (278, 4, height), (279, 4, len(strip))]
    start = 8 + 2 + 12 * len(tags) + 4  # the strip follows the one directory
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, value in tags:
        value = start if tag == 273 else value
        out += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, *((value, 0) if kind == 3 else (value,)))
    return out + struct.pack("<I", 0) + strip

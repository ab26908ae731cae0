"""Images from bytes: what a file is (from its magic bytes and header), and its pixels.

The header alone is read first (format, size: by Pillow's plugins, by ``pnm``
for PNM, by pillow-heif and Pillow for HEIF and AVIF) so that a decompression
bomb is refused before any pixel is decoded; OpenCV decodes, pillow-heif and
Pillow decode HEIF and AVIF (``heif``). Nothing here is an operator: the decode
steps (``beamzoo.transforms.preprocess``), their worker processes
(``beamzoo.transforms.isolated``) and the int8 calibration (``beamzoo.zoo.quantize``)
share these functions, so they see the same pixels.
"""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
from PIL import Image

from beamzoo.imaging.heif import decode_heif, ftyp_format, heif_size
from beamzoo.imaging.jpeg import jpeg_end
from beamzoo.imaging.pnm import decode_pnm, is_pnm, pnm_header

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


# The formats beamzoo decodes, by the magic bytes they start with; nothing else reaches a decoder.
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PNM", "HEIF", "AVIF")
# What a directory's listing takes for an image (a glob takes any name; formats are told by content).
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
              ".ppm", ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif")


def magic_format(data: bytes) -> str | None:
    """The format ``data``'s first bytes name, of those beamzoo decodes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if is_pnm(data):
        return "PNM"
    if (fmt := ftyp_format(data)) is not None:
        return fmt
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def known_format(data: bytes) -> str:
    """``magic_format(data)``; raises ValueError for bytes in no format beamzoo reads."""
    fmt = magic_format(data)
    if fmt is None:
        raise ValueError(f"not an image in a known format: beamzoo reads {', '.join(FORMATS)} "
                         f"(starts with {bytes(data[:16])!r})")
    return fmt


def read_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height), the header read by Pillow's plugin for the format the
    magic bytes name (and no other, so that the two cannot disagree on what the file is).

    Not ``Image.open``: its own bomb check (a process-wide setting) would
    override the caller's ``max_pixels``.
    """
    fmt = known_format(data)
    if fmt == "PNM":
        header = pnm_header(data)
        return fmt, header.width, header.height
    if fmt in ("HEIF", "AVIF"):
        return (fmt, *heif_size(fmt, data))
    Image.init()
    factory, _ = Image.OPEN[fmt]
    try:
        with factory(io.BytesIO(data), "") as im:
            return fmt, im.size[0], im.size[1]
    except Exception as exc:  # noqa: BLE001 - Pillow's reason, as the dead letter's
        raise ValueError(f"corrupt {fmt} header ({type(exc).__name__}: {exc})") from None


def sniff(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height); raises on a non-image or a decompression bomb."""
    fmt, w, h = read_header(data)
    if w * h > max_pixels:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(raise max_pixels to accept it)")
    if w == 0 or h == 0:
        raise ValueError(f"image has no pixels ({w}x{h})")
    return fmt, w, h


def check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunk declares more bytes than the file holds.

    OpenCV allocates what a chunk declares before reading it: one flipped
    byte in a 3 KB file can make it reserve 1.8 GiB.
    """
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        left = len(data) - pos - 12
        if length > left:
            raise ValueError(f"PNG is corrupt or truncated: chunk {kind.decode('latin-1')!r} "
                             f"declares {length} bytes, only {max(left, 0)} follow")
        if kind == b"IEND":
            return
        pos += length + 12


def _jpeg_truncated(data: bytes) -> bool:
    """Whether the JPEG's marker structure ends before its end-of-image marker. Bytes
    after that marker (phones append whole videos) do not matter; a structure libjpeg
    would still read (junk between segments) is left to the decoder."""
    try:
        return jpeg_end(data) is None
    except ValueError:
        return False


def decode(data: bytes, max_pixels: int, min_side: int | None = None, channels: str = "RGB") -> np.ndarray:
    """Bytes to an HxWx3 uint8 array, EXIF orientation applied.

    JPEGs much larger than ``min_side`` are decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling), never below ``min_side`` on the short side.
    """
    fmt, w, h = sniff(data, max_pixels)
    factor = 1
    if fmt == "PNM":
        img = decode_pnm(data)
    elif fmt in ("HEIF", "AVIF"):
        img = decode_heif(fmt, data)
    else:
        img, factor = _imdecode(data, fmt, w, h, min_side)
    if img.shape[0] * img.shape[1] > -(-w // factor) * -(-h // factor):
        raise ValueError(f"this {fmt} decoded to {img.shape[1]}x{img.shape[0]}, more pixels than its header's "
                         f"{w}x{h}: the file is not what its header says")
    if channels == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def _imdecode(data: bytes, fmt: str, w: int, h: int, min_side: int | None) -> tuple[np.ndarray, int]:
    """OpenCV's BGR pixels, and the scale (1, 2, 4, 8) a big JPEG was decoded at."""
    if fmt == "JPEG" and _jpeg_truncated(data):
        raise ValueError("truncated JPEG (the data ends before its end-of-image marker)")
    if fmt == "PNG":
        check_png_chunks(data)
    flags, factor = cv2.IMREAD_COLOR, 1
    if fmt == "JPEG" and min_side:
        factor = max((f for f in _REDUCED if min(w, h) // f >= min_side), default=1)
        flags = _REDUCED.get(factor, cv2.IMREAD_COLOR)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError(f"could not decode this {fmt} image (corrupt or truncated)")
    return img, factor

"""PNM (Netpbm) images: PBM (P1, P4), PGM (P2, P5) and PPM (P3, P6).

The header is parsed here, exactly (magic, whitespace and ``#`` comments,
width, height, maxval), so that its size feeds the pixel limit before any
pixel is decoded and a file shorter than its header promises never reaches
the decoder. Pillow decodes, scaling samples from 0..maxval to 0..255; grey
becomes three channels, as every other format gives.
"""
from __future__ import annotations

import io
import re
from typing import NamedTuple

import cv2
import numpy as np
from PIL import PpmImagePlugin

_MAGIC = re.compile(rb"P[1-6](?:[ \t\n\v\f\r#]|$)")
_SEP = re.compile(rb"(?:[ \t\n\v\f\r]|#[^\r\n]*)+")  # whitespace and comments, between header fields
_NUM = re.compile(rb"\d+")
_END = re.compile(rb"(?:#[^\r\n]*)?[ \t\n\v\f\r]")  # the one whitespace before the raster
_MAX_HEADER = 1 << 20  # a header, comments and all, ends within this many bytes
_MAX_SIDE = 2**31 - 1
_CHANNELS = {"P1": 1, "P2": 1, "P3": 3, "P4": 1, "P5": 1, "P6": 3}


class PnmHeader(NamedTuple):
    kind: str  # "P1" .. "P6"
    width: int
    height: int
    maxval: int  # 1 for the bitmaps (P1, P4)
    offset: int  # where the raster starts

    @property
    def ascii(self) -> bool:
        return self.kind in ("P1", "P2", "P3")


def is_pnm(data: bytes) -> bool:
    """Whether ``data`` starts with a PNM magic number (P1 to P6, then whitespace or a comment)."""
    return _MAGIC.match(data[:3]) is not None


def pnm_header(data: bytes) -> PnmHeader:
    """The header of the PNM in ``data``; ValueError if it is malformed or truncated."""
    if not is_pnm(data):
        raise ValueError(f"not a PNM: starts with {bytes(data[:3])!r}")
    kind, end = bytes(data[:2]).decode(), min(len(data), _MAX_HEADER)
    names = ("width", "height") if kind in ("P1", "P4") else ("width", "height", "maxval")
    pos, values = 2, []
    for name in names:
        sep = _SEP.match(data, pos, end)
        num = _NUM.match(data, sep.end(), end) if sep else None
        if num is None:
            at = sep.end() if sep else pos
            if at >= end:
                raise ValueError(f"PNM header is truncated before its {name}" if end == len(data) else
                                 f"PNM header is corrupt: no {name} within its first {_MAX_HEADER} bytes")
            raise ValueError(f"PNM header is corrupt: expected the {name} at offset {at}, "
                             f"found {bytes(data[at:at + 8])!r}")
        if len(num.group()) > 10 or int(num.group()) > _MAX_SIDE:
            raise ValueError(f"PNM header is corrupt: its {name} {int(num.group())} is absurd")
        values.append(int(num.group()))
        pos = num.end()
    tail = _END.match(data, pos, end)
    if tail is None:
        raise ValueError("PNM header is truncated after its last field" if pos >= len(data) else
                         f"PNM header is corrupt: no whitespace after its last field (offset {pos})")
    maxval = values[2] if len(values) == 3 else 1
    if not 1 <= maxval <= 65535:
        raise ValueError(f"PNM header is corrupt: maxval {maxval} is outside 1..65535")
    return PnmHeader(kind, values[0], values[1], maxval, tail.end())


def check_pnm_data(header: PnmHeader, data: bytes) -> None:
    """Refuse a PNM whose raster is shorter than its header promises (an ASCII raster:
    shorter than its samples take at the least, one character each and whitespace between)."""
    k, w, h = header.kind, header.width, header.height
    samples = w * h * _CHANNELS[k]
    if k == "P4":
        need = -(-w // 8) * h
    elif k == "P1":
        need = samples  # digits need no whitespace between them
    elif header.ascii:
        need = 2 * samples - 1
    else:
        need = samples * (1 if header.maxval < 256 else 2)
    have = len(data) - header.offset
    if have < need:
        least = "at least " if header.ascii else ""
        raise ValueError(f"PNM data is shorter than its header promises: a {w}x{h} {k} needs {least}{need} "
                         f"bytes of pixels, {have} follow (truncated?)")


def decode_pnm(data: bytes) -> np.ndarray:
    """A PNM's pixels as HxWx3 uint8 BGR (OpenCV's order). Pillow decodes the raster behind
    a plain header made from this module's parse, so that the two cannot read it differently."""
    header = pnm_header(data)
    check_pnm_data(header, data)
    plain = f"{header.kind}\n{header.width} {header.height}\n".encode()
    if header.kind not in ("P1", "P4"):
        plain += b"%d\n" % header.maxval
    try:
        with PpmImagePlugin.PpmImageFile(io.BytesIO(plain + memoryview(data)[header.offset:])) as im:
            im.load()
            img = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - Pillow's reason, as the dead letter's
        raise ValueError(f"could not decode this PNM ({header.kind}) image ({type(exc).__name__}: {exc})") from None
    if img.dtype == bool:  # a bitmap: True is white
        img = np.where(img, np.uint8(255), np.uint8(0))
    elif img.dtype != np.uint8:  # 16-bit grey, 0..65535
        img = _EIGHT_BITS[img]
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR)


_EIGHT_BITS = np.round(np.arange(65536) / 257).astype(np.uint8)


__all__ = ["PnmHeader", "check_pnm_data", "decode_pnm", "is_pnm", "pnm_header"]

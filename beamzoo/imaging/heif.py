"""HEIF (HEIC, what phones write) and AVIF images: both ISO base media files, told
apart by the brands of their ``ftyp`` box.

pillow-heif (libheif) reads HEIF, Pillow's own plugin (libavif) reads AVIF. Both
open a file without decoding it, so its size is known, and checked against the
pixel limit, before any pixel is decoded. libheif applies the file's rotation
and mirroring itself; for AVIF, Pillow turns them into an EXIF orientation,
applied here.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pillow_heif
from PIL import AvifImagePlugin, ImageOps

_AVIF = {b"avif", b"avis"}
_HEIF = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def ftyp_format(data: bytes) -> str | None:
    """"AVIF" or "HEIF" from the brands of ``data``'s ftyp box (AVIF first: its files
    name the generic HEIF brands too), else None (an MP4, a MOV, not a media file)."""
    if data[4:8] != b"ftyp":
        return None
    end = min(len(data), max(16, int.from_bytes(data[:4], "big")), 4096)
    brands = {bytes(data[8:12])} | {bytes(data[i:i + 4]) for i in range(16, end - 3, 4)}
    return "AVIF" if brands & _AVIF else "HEIF" if brands & _HEIF else None


def decoder_threads(n: int) -> None:
    """Let the HEIF and AVIF decoders use ``n`` threads (for worker processes that are the
    parallelism themselves)."""
    pillow_heif.options.DECODE_THREADS = n
    AvifImagePlugin.DEFAULT_MAX_THREADS = n


def _open_heif(data: bytes) -> pillow_heif.HeifFile:
    try:
        return pillow_heif.open_heif(data, convert_hdr_to_8bit=True, bgr_mode=True)
    except Exception as exc:  # noqa: BLE001 - libheif's reason, as the dead letter's
        raise ValueError(f"corrupt HEIF header ({type(exc).__name__}: {str(exc).strip()})") from None


def _open_avif(data: bytes) -> AvifImagePlugin.AvifImageFile:
    try:
        return AvifImagePlugin.AvifImageFile(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - libavif's reason, as the dead letter's
        raise ValueError(f"corrupt AVIF header ({type(exc).__name__}: {str(exc).strip()})") from None


def heif_size(fmt: str, data: bytes) -> tuple[int, int]:
    """(width, height) of the primary image, from the container alone: nothing is decoded."""
    if fmt == "AVIF":
        with _open_avif(data) as im:
            return im.size
    try:
        return _open_heif(data).size
    except IndexError:  # pillow-heif found no image it reads
        raise ValueError("corrupt HEIF header (no image in it)") from None


def _to_bgr(img: np.ndarray, order: str) -> np.ndarray:
    """8-bit, three channels, BGR; alpha is dropped, as OpenCV drops it from a PNG."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2BGR if order == "RGB" else cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if order == "RGB" else img


def decode_heif(fmt: str, data: bytes) -> np.ndarray:
    """The primary image of a HEIF or AVIF file as HxWx3 uint8 BGR (OpenCV's order)."""
    src = _open_avif(data) if fmt == "AVIF" else _open_heif(data)
    try:
        if fmt == "AVIF":
            with src:
                ImageOps.exif_transpose(src, in_place=True)
                return _to_bgr(np.asarray(src), "RGB")
        return _to_bgr(np.asarray(src), "BGR")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the decoder's reason, as the dead letter's
        if any(words in str(exc).lower() for words in ("out of memory", "memory allocation")):  # libheif's
            raise MemoryError(f"the {fmt} decoder ran out of memory ({str(exc).strip()})") from None
        raise ValueError(f"could not decode this {fmt} image ({type(exc).__name__}: {str(exc).strip()})") from None


__all__ = ["decode_heif", "decoder_threads", "ftyp_format", "heif_size"]

"""Resizing and cropping decoded images, and scaling them to a model's input."""
from __future__ import annotations

import math

import cv2
import numpy as np

from beamzoo.imaging.decode import decode

SHRINK_FILTERS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


def resize_crop(img: np.ndarray, resize: int, crop: int, shrink: str = "area") -> np.ndarray:
    """Short side to ``resize`` (``shrink`` filter when shrinking, bilinear when
    enlarging), then a centre crop.

    With an extreme aspect ratio (say 1 x 10000) the resized image would be
    enormous, so the long side is first cut to what the crop keeps.
    """
    h, w = img.shape[:2]
    scale = resize / min(h, w)
    keep = math.ceil(crop / scale) + 2  # source pixels the crop needs, and a margin for the filter
    if max(h, w) * scale > 4 * resize and max(h, w) > keep:
        if h > w:
            img = img[(h - keep) // 2:(h - keep) // 2 + keep]
        else:
            img = img[:, (w - keep) // 2:(w - keep) // 2 + keep]
        h, w = img.shape[:2]
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    interp = SHRINK_FILTERS[shrink] if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return img[top:top + crop, left:left + crop]


def scaled(crop: np.ndarray, layout: str = "NCHW", value_range=(-1.0, 1.0)) -> np.ndarray:
    """A cropped HxWx3 uint8 image as float32, its 0..255 scaled to ``value_range``, laid out as
    ``layout`` (NCHW or NHWC)."""
    lo, hi = value_range
    out = crop.astype(np.float32)
    out *= np.float32((hi - lo) / 255.0)
    out += np.float32(lo)
    if layout == "NCHW":
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out)


def decode_resized(data: bytes, max_pixels: int, min_side: int | None, resize: int, crop: int,
                   shrink: str = "area", channels: str = "RGB") -> np.ndarray:
    """Bytes to the uint8 crop a model takes: decoded (big JPEGs at reduced size, never below
    ``min_side``), short side to ``resize``, centre crop ``crop``, in ``channels`` order (the
    order is changed on the crop, not the photo). An exception raised carries ``part``: 0 if
    decoding failed, 1 if resizing did."""
    try:
        img = decode(data, max_pixels, min_side, "BGR")
    except Exception as exc:
        exc.part = 0
        raise
    try:
        img = resize_crop(img, resize, crop, shrink)
    except Exception as exc:
        exc.part = 1
        raise
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if channels == "RGB" else np.ascontiguousarray(img)

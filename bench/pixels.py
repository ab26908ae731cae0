"""Plain OpenCV decode and preprocess for the non-beamzoo contenders.

The same pixel work as beamzoo's score_images graph, written directly:
read the file, read the JPEG header, decode at 1/2, 1/4 or 1/8 scale when the
short side stays >= 256 (libjpeg DCT scaling), resize the short side to 256
(INTER_AREA when shrinking), centre-crop 224, RGB, scale to [-1, 1], NCHW.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

RESIZE, CROP = 256, 224
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def decode(data: bytes, min_side: int = RESIZE) -> np.ndarray:
    """JPEG bytes -> HxWx3 BGR uint8, decoded at reduced scale when possible."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    factor = max(f for f in _REDUCED if min(w, h) // f >= min_side or f == 1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor])
    if img is None:
        raise ValueError("could not decode image")
    return img


def preprocess(img: np.ndarray, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """BGR image -> 3xCROPxCROP float32 RGB in [-1, 1]."""
    h, w = img.shape[:2]
    scale = resize / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    img = cv2.cvtColor(img[top:top + crop, left:left + crop], cv2.COLOR_BGR2RGB)
    out = img.astype(np.float32)
    out *= np.float32(2 / 255)
    out -= np.float32(1)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def load(path: str) -> np.ndarray:
    return preprocess(decode(read(path)))


def load_labels(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line]

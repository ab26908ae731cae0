"""Where the detector looks: an image fitted to the detector's size limits, and
boxes mapped back from there to the image's own pixels.

``fit`` shrinks an image whose long side is over ``max_side`` (or enlarges one
whose short side is under ``min_side``, never past ``max_side``), each side a
multiple of 32, then pads a very flat image above and below (black) so the
detector sees text lines at a sensible scale. Crops are cut from the fitted
image. Both sides of what the detector sees are bounded whatever the image's
shape: a sliver of a few pixels cannot make it tens of thousands of pixels long.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Fitted:
    image: np.ndarray  # what the detector sees and crops are cut from (BGR)
    scale_x: float  # original pixels per fitted pixel
    scale_y: float
    pad_top: int  # rows of padding above the image
    height: int  # the original image's size
    width: int

    def to_original(self, quad: np.ndarray) -> np.ndarray:
        """A 4x2 quad in fitted pixels -> in the original image (clipped to it)."""
        out = quad.astype(np.float32).copy()
        out[:, 1] -= self.pad_top
        out[:, 0] *= self.scale_x
        out[:, 1] *= self.scale_y
        out[:, 0] = np.clip(out[:, 0], 0, self.width)
        out[:, 1] = np.clip(out[:, 1], 0, self.height)
        return out


def _multiple_of_32(h: int, w: int, ratio: float) -> tuple[int, int]:
    return (max(32, int(round(int(h * ratio) / 32) * 32)), max(32, int(round(int(w * ratio) / 32) * 32)))


def fit(img: np.ndarray, max_side: int = 2000, min_side: int = 30, min_height: int = 30,
        flat_ratio: float = 8.0) -> Fitted:
    h0, w0 = img.shape[:2]
    out = img
    if max(h0, w0) > max_side:
        nh, nw = _multiple_of_32(h0, w0, max_side / max(h0, w0))
        out = cv2.resize(out, (nw, nh))
    h, w = out.shape[:2]
    if min(h, w) < min_side and max(h, w) < max_side:
        nh, nw = _multiple_of_32(h, w, min(min_side / min(h, w), max_side / max(h, w)))
        out = cv2.resize(out, (nw, nh))
    h, w = out.shape[:2]
    pad = 0
    if h <= min_height or w / h > flat_ratio:
        pad = int(abs(max(int(w / flat_ratio), min_height) * 2 - h) / 2)
        out = cv2.copyMakeBorder(out, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return Fitted(out, w0 / w, h0 / h, pad, h0, w0)


MAX_ASPECT = 8  # the detector's input is enlarged to at most this times limit_side on its long side


def input_size(h: int, w: int, limit_side: int = 736) -> tuple[int, int]:
    """(height, width) of the detector's input for a fitted image: the short side enlarged to
    ``limit_side``, but the long side to no more than ``MAX_ASPECT * limit_side`` (a very tall
    image is seen with a shorter short side), each side a multiple of 32."""
    ratio = limit_side / min(h, w) if min(h, w) < limit_side else 1.0
    ratio = min(ratio, max(1.0, MAX_ASPECT * limit_side / max(h, w)))
    return _multiple_of_32(h, w, ratio)


def detector_input(img: np.ndarray, limit_side: int = 736) -> np.ndarray:
    """The fitted image as the detector's input (``input_size``), scaled to -1..1, NCHW with
    a batch of one."""
    nh, nw = input_size(*img.shape[:2], limit_side)
    x = cv2.resize(img, (nw, nh)).astype(np.float32)
    x *= np.float32(1 / 127.5)
    x -= np.float32(1)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def order_quad(points: np.ndarray) -> np.ndarray:
    """Four corners as top-left, top-right, bottom-right, bottom-left: the two
    leftmost points are the left side (the upper of them first), likewise the right."""
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    left = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")]
    right = by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    return np.array([left[0], right[0], right[1], left[1]], np.float32)

"""Text boxes from a DB (Differentiable Binarization) probability map.

The detector gives each pixel a probability of being text. Pixels over
``thresh`` form a mask (dilated by one pixel); each connected outline becomes
its minimum-area rectangle, kept when the mean probability inside is at least
``box_thresh``. The model is trained on shrunk text regions, so a kept
rectangle is grown back ("unclipped") by ``area * unclip_ratio / perimeter``
on every side, with rounded corners, and the minimum-area rectangle of that is
scaled to the image's pixels.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

_DILATE = np.ones((2, 2), np.uint8)


def _corners(rect) -> np.ndarray:
    """A rotated rectangle's corners: top-left, top-right, bottom-right, bottom-left.
    Of the two leftmost corners the lower is bottom-left, of the two rightmost the
    lower is bottom-right (on a tie, the one further right)."""
    pts = sorted(cv2.boxPoints(rect).tolist(), key=lambda p: p[0])
    tl, bl = (pts[0], pts[1]) if pts[1][1] > pts[0][1] else (pts[1], pts[0])
    tr, br = (pts[2], pts[3]) if pts[3][1] > pts[2][1] else (pts[3], pts[2])
    return np.array([tl, tr, br, bl], np.float32)


def mean_inside(prob: np.ndarray, quad: np.ndarray) -> float:
    """The mean probability inside ``quad`` (its corners truncated to whole pixels)."""
    h, w = prob.shape
    x0 = int(np.clip(math.floor(quad[:, 0].min()), 0, w - 1))
    x1 = int(np.clip(math.ceil(quad[:, 0].max()), 0, w - 1))
    y0 = int(np.clip(math.floor(quad[:, 1].min()), 0, h - 1))
    y1 = int(np.clip(math.ceil(quad[:, 1].max()), 0, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    local = (quad - np.array([x0, y0], np.float32)).astype(np.int32)
    cv2.fillPoly(mask, local.reshape(1, -1, 2), 1)
    return cv2.mean(prob[y0:y1 + 1, x0:x1 + 1], mask)[0]


def _round(v: np.ndarray) -> np.ndarray:
    """To whole pixels, halves away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def unclip(quad: np.ndarray, ratio: float, arc_tolerance: float = 0.25) -> np.ndarray:
    """The outline of ``quad`` grown by ``area * ratio / perimeter``: its corners are
    taken to whole pixels, each side moved out by that distance and each corner
    rounded with arc points at most ``arc_tolerance`` inside the true arc. The
    outline's points are whole pixels (int32, Nx2)."""
    x, y = quad[:, 0].astype(np.float64), quad[:, 1].astype(np.float64)
    signed = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    perimeter = float(np.linalg.norm(quad - np.roll(quad, -1, axis=0), axis=1).sum())
    dist = abs(signed) * ratio / perimeter
    src = np.trunc(quad.astype(np.float64))
    src = src[np.any(src != np.roll(src, 1, axis=0), axis=1)]  # repeated corners
    if len(src) < 3 or dist <= 0:
        return src.astype(np.int32)
    edges = np.roll(src, -1, axis=0) - src
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1) / np.linalg.norm(edges, axis=1)[:, None]
    sx, sy = src[:, 0], src[:, 1]
    if np.dot(sx, np.roll(sy, -1)) - np.dot(np.roll(sx, -1), sy) < 0:
        normals = -normals  # outward for either winding
    steps_round = math.pi / math.acos(1 - min(arc_tolerance, dist * arc_tolerance) / dist)
    steps_round = min(steps_round, dist * math.pi)
    step = 2 * math.pi / steps_round
    points = []
    for j in range(len(src)):
        before, after = normals[j - 1], normals[j]
        sin_a = before[0] * after[1] - before[1] * after[0]
        angle = math.atan2(sin_a, float(np.dot(before, after)))
        n = max(int(_round(np.array(steps_round / (2 * math.pi) * abs(angle)))), 1)
        turn = step if sin_a >= 0 else -step
        for i in range(n):
            c, s = math.cos(turn * i), math.sin(turn * i)
            v = np.array([before[0] * c - before[1] * s, before[0] * s + before[1] * c])
            points.append(_round(src[j] + v * dist))
        points.append(_round(src[j] + after * dist))
    return np.array(points, np.int32)


def boxes(prob: np.ndarray, height: int, width: int, thresh: float = 0.3, box_thresh: float = 0.5,
          unclip_ratio: float = 1.6, max_candidates: int = 1000,
          min_size: float = 3) -> list[tuple[np.ndarray, float]]:
    """(quad, score) of each text box in a HxW probability map, the quad in the
    pixels of a ``height`` x ``width`` image (rounded, as int32 corners)."""
    mask = cv2.dilate((prob > thresh).astype(np.uint8), _DILATE)
    contours, _ = cv2.findContours(mask * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    mh, mw = prob.shape
    out = []
    for contour in contours[:max_candidates]:
        rect = cv2.minAreaRect(contour)
        if min(rect[1]) < min_size:
            continue
        score = mean_inside(prob, _corners(rect))
        if score < box_thresh:
            continue
        grown = cv2.minAreaRect(unclip(_corners(rect), unclip_ratio))
        if min(grown[1]) < min_size + 2:
            continue
        quad = _corners(grown)
        quad[:, 0] = np.clip(np.round(quad[:, 0] / mw * width), 0, width)
        quad[:, 1] = np.clip(np.round(quad[:, 1] / mh * height), 0, height)
        out.append((quad.astype(np.int32), float(score)))
    return out

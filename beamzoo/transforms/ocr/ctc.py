"""Greedy CTC decoding: the best class at each step, repeats merged, blanks dropped.
A line's score is the mean probability of the characters kept (0 for none)."""
from __future__ import annotations

import numpy as np


def decode(probs: np.ndarray, characters: list[str]) -> list[tuple[str, float]]:
    """``probs`` [N, steps, classes] (class 0 the blank) -> (text, score) per row."""
    best = probs.argmax(axis=2)
    conf = probs.max(axis=2)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    out = []
    for row, k, c in zip(best, keep, conf):
        text = "".join(characters[i] for i in row[k])
        out.append((text, float(c[k].mean()) if k.any() else 0.0))
    return out

"""Greedy CTC decoding: the best class at each step, repeats merged, blanks dropped.
A line's score is the mean probability of the characters kept (0 for none).

The recognizer often reads a narrow space as nothing at all ("Invoicenumber4711")
although the space class is its clear second choice in the steps between the two
words. So a space is inserted between two characters the decoder keeps (and the
model put no space between) when, in the steps between them, the space class's
probability reaches ``space_prob``; or a quarter of that where the two are at least
``space_gap`` times the line's typical distance apart (the median step distance of
its consecutive characters). Nothing is inserted between two wide characters
(CJK, kana, hangul, full-width forms), which are written without spaces. Spaces
are only ever added inside a line (spaces the model reads at its ends are dropped):
with them removed the text is what plain greedy decoding reads.
"""
from __future__ import annotations

import unicodedata

import numpy as np

SPACE_PROB = 0.01  # on rendered pages no gap inside a word came above 0.007, most narrow spaces above 0.015
SPACE_GAP = 1.4


def decode(probs: np.ndarray, characters: list[str], space_prob: float = SPACE_PROB,
           space_gap: float = SPACE_GAP) -> list[tuple[str, float]]:
    """``probs`` [N, steps, classes] (class 0 the blank) -> (text, score) per row.
    ``space_prob`` 1 inserts no spaces."""
    best = probs.argmax(axis=2)
    conf = probs.max(axis=2)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    space_ids = [i for i, ch in enumerate(characters) if ch == " "]
    p_space = probs[:, :, space_ids].sum(axis=2) if space_ids else np.zeros(best.shape, np.float32)
    out = []
    for row, k, c, ps in zip(best, keep, conf, p_space):
        starts = np.flatnonzero(k)
        chars = [characters[i] for i in row[starts]]
        if space_prob < 1 and len(starts) > 1:
            text = add_spaces(chars, starts, run_ends(row, starts), ps, space_prob, space_gap)
        else:
            text = "".join(chars)
        out.append((text.strip(" "), float(c[k].mean()) if k.any() else 0.0))
    return out


def run_ends(best: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The last step of each run of one class that begins at ``starts``."""
    last = np.flatnonzero(np.append(best[1:] != best[:-1], True))  # the last step of every run
    return last[np.searchsorted(last, starts)]


def add_spaces(chars: list[str], starts, ends, p_space, space_prob: float = SPACE_PROB,
               space_gap: float = SPACE_GAP) -> str:
    """The characters a line decodes to (each the run of steps ``starts[i]..ends[i]``), with
    a space inserted where the rule above finds one; ``p_space``: the space class's
    probability at each step.

    >>> add_spaces(list("abcd"), [0, 3, 6, 9], [0, 3, 6, 9], [0, 0, 0, 0, 0.03, 0, 0, 0, 0, 0])
    'ab cd'
    """
    solid = [i for i, ch in enumerate(chars) if ch != " "]
    if len(solid) < 2:
        return "".join(chars)
    pitch = float(np.median(np.diff([starts[i] for i in solid])))
    out = chars[:solid[0] + 1]
    for a, b in zip(solid, solid[1:]):
        between = chars[a + 1:b]  # spaces the model read
        if not between and not (_wide(chars[a]) and _wide(chars[b])):
            gap = p_space[ends[a] + 1:starts[b]]
            p = float(np.max(gap)) if len(gap) else 0.0
            if p >= space_prob or (p >= space_prob / 4 and starts[b] - starts[a] >= space_gap * pitch):
                between = [" "]
        out += [*between, chars[b]]
    out += chars[solid[-1] + 1:]
    return "".join(out)


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")

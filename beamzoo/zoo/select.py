"""Selectors: models chosen by task, tags and bounds on their metrics, cheapest first.

    select(task="image-classification", where=["imagenet_top1 >= 0.76"])
    parse("task=image-classification,tag=int8,imagenet_top1>=0.76")   # the command line's form

Cheapest: by ``ms_per_image`` when every match has it, else ``gflops`` when
every match has it, else by the size of the model file.
"""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass

from beamzoo.zoo.card import ModelCard
from beamzoo.zoo.repository import all_cards

OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
       "<": operator.lt}
_BOUND = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


class SelectorError(ValueError):
    """A selector that cannot be read, or that no model matches."""


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    value: float

    def __str__(self):
        return f"{self.metric}{self.op}{self.value:g}"

    def why_not(self, card: ModelCard) -> str | None:
        have = card.metric(self.metric)
        if have is None:
            return f"has no {self.metric} metric"
        return None if OPS[self.op](have, self.value) else f"has {self.metric} {have:g}"


def bound(text: str) -> Bound:
    m = _BOUND.match(text)
    if not m:
        raise SelectorError(f"cannot read the bound {text!r}: write METRIC OP NUMBER, e.g. "
                            "imagenet_top1>=0.76 (OP one of >=, <=, >, <, ==, !=)")
    return Bound(m.group(1), m.group(2), float(m.group(3)))


def parse(text: str) -> dict:
    """``task=T,tag=A,tag=B,METRIC OP N,...`` -> keyword arguments of ``select``."""
    task, tags, where = None, [], []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        key, eq, value = term.partition("=")
        if eq and key.strip() in ("task", "tag", "tags") and not value.startswith("="):
            if key.strip() == "task":
                task = value.strip()
            else:
                tags += [v for v in value.strip().split("+") if v]
        else:
            where.append(bound(term))
    return {"task": task, "tags": tags, "where": where}


def _cost_key(cards: list[ModelCard]):
    for metric in ("ms_per_image", "gflops"):
        if cards and all(c.metric(metric) is not None for c in cards):
            return lambda c: (c.metric(metric), c.ref)
    return lambda c: (os.path.getsize(c.file) if os.path.exists(c.file) else float("inf"), c.ref)


def select(task: str | None = None, tags=(), where=(), cards: list[ModelCard] | None = None) -> list[ModelCard]:
    """The cards that match, cheapest first; ``where``: bounds such as ``"imagenet_top1>=0.76"``.
    Raises SelectorError saying which bound excluded which model when none matches."""
    if cards is None:
        cards = all_cards()
    bounds = [b if isinstance(b, Bound) else bound(b) for b in ([where] if isinstance(where, str) else where)]
    tags = [tags] if isinstance(tags, str) else list(tags)
    matched, excluded = [], []
    for c in cards:
        why = []
        if task is not None and c.task != task:
            why.append(f"is task {c.task}")
        why += [f"lacks tag {t!r}" for t in tags if t not in c.tags]
        why += [f"{w} (needs {b})" for b in bounds if (w := b.why_not(c))]
        (excluded.append(f"{c.ref} {'; '.join(why)}") if why else matched.append(c))
    if not matched:
        asked = ", ".join([f"task={task}"] * (task is not None) + [f"tag={t}" for t in tags]
                          + [str(b) for b in bounds]) or "anything"
        raise SelectorError(f"no model matches {asked}: " + ("; ".join(excluded) or "the zoo is empty"))
    return sorted(matched, key=_cost_key(matched))

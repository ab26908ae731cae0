"""The search space: what the graph's own declarations say may be tried, and the zoo's variants.

A dimension is a knob of the command that will run the configuration whose declaration
lists values to try (``Knob.tune``) and which a step of the built graph declares (the
very declaration: ``Classify`` passes ``OnnxInference``'s ``batch_size`` on, it does not
copy it), or the runner's or the server's. Its values are ``Knob.candidates(cores)``;
the tuner writes no list of its own. The models are the zoo's cards with the task and
the labels of the command line's model (fp32 and int8, Lite0/1/2), and cascades of a
cheaper and a costlier one at each threshold a cascade's ``below`` declares.

>>> from beamzoo.core.knobs import Knob
>>> d = Dim("batch_size", "batch_size", Knob(4, int, low=1, tune=(1, 4, 16)).candidates(2), 4, "step")
>>> [c["batch_size"] for c in grid([d])]
[1, 4, 16]
>>> neighbours({"batch_size": 4}, [d])
[{'batch_size': 1}, {'batch_size': 16}]
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from beamzoo.cascade import label_problem
from beamzoo.core.graph import Graph
from beamzoo.core.knobs import Knob, pick
from beamzoo.core.registry import op_class
from beamzoo.runners.edge import EdgeRunner
from beamzoo.serve.knobs import SERVER_KNOBS
from beamzoo.zoo import ModelCard, all_cards, classifier_problem

RUNNER_KNOBS = pick(EdgeRunner, "workers")  # what score_images.py, ocr_images.py and `beamzoo run` take


@dataclass(frozen=True)
class Dim:
    """One knob to tune: ``name`` as its builder takes it, ``flag`` as the config file writes it;
    ``level``: ``step`` (``steps``: the ids of the graph's steps that declare it), ``runner`` or
    ``server``; ``results``: its values may change the answers (not only the speed)."""

    name: str
    flag: str
    values: tuple
    default: Any
    level: str
    steps: tuple[str, ...] = ()
    results: bool = False


def _dim(name: str, flag: str, knob: Knob, cores: int, level: str, steps: tuple = ()) -> Dim:
    default = cores if knob.default is None and knob.tune == "cores" else knob.default
    return Dim(name, flag, knob.candidates(cores), default, level, steps, knob.results)


def step_dims(graph: Graph, knobs: dict[str, Knob], flags: dict[str, str], cores: int) -> list[Dim]:
    """The command's knobs (``knobs``, spelt ``flags``) that a step of ``graph`` declares with
    values to try."""
    steps: dict[str, list[str]] = {}
    for s in graph.steps:
        declared = op_class(s.op).knobs.values()
        for name, knob in knobs.items():
            if knob.tune is not None and any(knob is k for k in declared):
                steps.setdefault(name, []).append(s.id)
    return [_dim(n, flags.get(n, n), knobs[n], cores, "step", tuple(ids)) for n, ids in steps.items()]


def runner_dims(cores: int) -> list[Dim]:
    return [_dim(n, n, k, cores, "runner") for n, k in RUNNER_KNOBS.items() if k.tune is not None]


def server_dims(cores: int) -> list[Dim]:
    return [_dim(n, n, k, cores, "server") for n, k in SERVER_KNOBS.items() if k.tune is not None]


def grid(dims: list[Dim]) -> Iterator[dict]:
    """Every combination of the dimensions' values."""
    for values in itertools.product(*(d.values for d in dims)):
        yield {d.flag: v for d, v in zip(dims, values)}


def defaults(dims: list[Dim]) -> dict:
    return {d.flag: d.default for d in dims}


def neighbours(config: dict, dims: list[Dim]) -> list[dict]:
    """The configurations one step away along one dimension (a hill-climb's moves)."""
    out = []
    for d in dims:
        if config.get(d.flag) not in d.values:
            continue
        i = d.values.index(config[d.flag])
        out += [{**config, d.flag: d.values[j]} for j in (i - 1, i + 1) if 0 <= j < len(d.values)]
    return out


# ------------------------------------------------------------------ the models

def variants(card: ModelCard, cards: list[ModelCard] | None = None) -> list[ModelCard]:
    """The classifiers of the zoo that can stand for ``card``: its task, its labels."""
    cards = all_cards() if cards is None else cards
    same = [c for c in cards if c.task == card.task and classifier_problem(c) is None
            and label_problem(card, c) is None]
    return same if any(c.ref == card.ref for c in same) else [card, *same]


def strongest(cards: list[ModelCard]) -> ModelCard | None:
    """The card with the best top-1 accuracy its card states (``imagenet_top1``, else any
    ``*_top1`` metric), or None where no card states one."""
    for metric in ("imagenet_top1", None):
        scored = []
        for c in cards:
            names = [metric] if metric else sorted(n for n in c.metrics if n.endswith("_top1"))
            values = [c.metric(n) for n in names if c.metric(n) is not None]
            if values:
                scored.append((max(values), c.ref, c))
        if scored:
            return max(scored)[2]
    return None


@dataclass(frozen=True)
class Models:
    """The models of a configuration: one, or a cascade (``escalate`` below ``below``)."""

    model: str
    escalate: str | None = None
    below: float | None = None

    def knobs(self) -> dict:
        if not self.model:  # a graph without model variants (OCR's, a bundle's)
            return {}
        if self.escalate is None:
            return {"model": self.model}
        return {"model": self.model, "escalate": self.escalate, "escalate_below": self.below}

    @classmethod
    def of(cls, config: dict) -> Models:
        return cls(config["model"], config.get("escalate"), config.get("escalate_below"))


def cascades(refs_by_cost: list[str], thresholds: Callable[[str], tuple]) -> list[Models]:
    """Every cascade of a cheaper model and a costlier one (``refs_by_cost``: cheapest first)
    at each threshold ``thresholds(fast)`` gives."""
    return [Models(fast, strong, t) for i, fast in enumerate(refs_by_cost) for strong in refs_by_cost[i + 1:]
            for t in thresholds(fast)]


__all__ = ["Dim", "Models", "RUNNER_KNOBS", "cascades", "defaults", "grid", "neighbours", "runner_dims",
           "server_dims", "step_dims", "strongest", "variants"]

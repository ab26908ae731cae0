"""What the server serves: a model name and version with its served graph.

A zoo model is served as the batch pipeline's ``Classify`` graph; a bundle
as its own graph, under the name and version of its (first) model. Only
``zoo.get``, ``card.ref``, ``card.name``, ``card.version``, ``card.labels``
and ``signature`` below touch a card.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from beamzoo.bundle import BundleError, load
from beamzoo.classify import Classify
from beamzoo.core.compile import Plan
from beamzoo.core.graph import Graph, GraphBuilder
from beamzoo.serve.graph import served_plan
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files
from beamzoo.zoo import card_of
from beamzoo.zoo.repository import version_key


class UnknownServable(LookupError):
    """No served model of that name or version."""

    def __str__(self):
        return self.args[0]


def signature(card) -> dict:
    """The card's tensors: {"inputs": [...], "outputs": [...]}, each {name, dtype, shape}."""
    def one(t):
        return {"name": t.name, "dtype": t.dtype, "shape": [-1, *(-1 if d is None else d for d in t.shape)]}
    return {"inputs": [one(t) for t in card.inputs], "outputs": [one(t) for t in card.outputs]}


@dataclass
class Servable:
    name: str
    version: str
    card: object
    graph: Graph  # the batch graph it was made from
    plan: Plan

    @classmethod
    def of(cls, graph: Graph, card) -> Servable:
        return cls(card.name, str(card.version), card, graph, served_plan(graph))

    @classmethod
    def from_model(cls, ref, max_batch: int | None = None, **knobs) -> Servable:
        """A zoo model (``name[:version]``, a card file, or a card) as the batch pipeline classifies;
        ``knobs``: ``Classify``'s (``topk``, ``max_pixels``, ...); ``max_batch``: the rows of a batch."""
        card = card_of(ref)
        if max_batch is not None:
            knobs.setdefault("batch_size", max_batch)
        nowhere = tempfile.gettempdir()  # the file source and the sink are replaced: never read or written
        b = GraphBuilder()
        preds = b | Files(os.path.join(nowhere, "*")) | Classify(card, **knobs)
        preds | WriteParquet(os.path.join(nowhere, "predictions"))
        return cls.of(b.graph, card)

    @classmethod
    def from_bundle(cls, directory, trust=()) -> Servable:
        """An exported bundle (its lock checked, and signed by one of ``trust`` when given), under
        its first model's name and version."""
        graph = load(directory, os.path.join(tempfile.gettempdir(), "*"),
                     os.path.join(tempfile.gettempdir(), "beamzoo-serve"), trust=trust)
        models = [(op, name) for op in (s.operator() for s in graph.steps) for name in op.model_knobs()]
        if not models:
            raise BundleError(f"bundle {directory} runs no model; there is nothing to serve")
        op, name = models[0]
        return cls.of(graph, card_of(op.params[name]))  # the card as the step itself reads it


class Catalog:
    """Servables by name and version; a name alone means its newest version."""

    def __init__(self, servables: list[Servable]):
        self.by_name: dict[str, dict[str, Servable]] = {}
        for s in servables:
            versions = self.by_name.setdefault(s.name, {})
            if s.version in versions:
                raise ValueError(f"model {s.name} version {s.version} is given twice")
            versions[s.version] = s

    def versions(self, name: str) -> list[str]:
        if name not in self.by_name:
            raise UnknownServable(f"no model named {name!r} is served here; served: "
                                  f"{', '.join(sorted(self.by_name)) or 'none'}")
        return sorted(self.by_name[name], key=version_key)

    def get(self, name: str, version: str | None = None) -> Servable:
        versions = self.versions(name)
        if version is None:
            return self.by_name[name][versions[-1]]
        if version not in self.by_name[name]:
            raise UnknownServable(f"model {name!r} has no version {version!r} here; served versions: "
                                  f"{', '.join(versions)}")
        return self.by_name[name][version]

    def __iter__(self):
        return (s for v in self.by_name.values() for s in v.values())

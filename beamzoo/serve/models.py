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

from beamzoo.graph import Graph
from beamzoo.plan import Plan, plan
from beamzoo.serve.graph import serving_graph
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
        return cls(card.name, str(card.version), card, graph, plan(serving_graph(graph)))

    @classmethod
    def from_model(cls, ref, max_batch: int = 8, topk: int | None = None,
                   max_pixels: int = 100_000_000) -> Servable:
        """A zoo model (``name[:version]``, a card file, or a card) as the batch pipeline classifies;
        ``topk`` labels per answer (default 5, or all a smaller model has)."""
        from beamzoo import zoo
        from beamzoo.pipeline import Classify, Pipeline
        from beamzoo.transforms.sinks import WriteParquet
        from beamzoo.transforms.sources import Files
        card = zoo.get(ref) if isinstance(ref, str) else ref
        topk = min(5, len(card.labels)) if topk is None else topk
        nowhere = tempfile.gettempdir()  # the file source and the sink are replaced: never read or written
        p = Pipeline()
        preds = p | Files(os.path.join(nowhere, "*")) | Classify(card, topk=topk, batch_size=max_batch,
                                                                 max_pixels=max_pixels)
        preds | WriteParquet(os.path.join(nowhere, "predictions"))
        return cls.of(p.graph, card)

    @classmethod
    def from_bundle(cls, directory) -> Servable:
        """An exported bundle (its lock checked), under its first model's name and version."""
        from beamzoo.bundle import BundleError, load
        graph = load(directory, os.path.join(tempfile.gettempdir(), "*"),
                     os.path.join(tempfile.gettempdir(), "beamzoo-serve"))
        models = [s for s in graph.steps if s.op == "onnx_infer"]
        if not models:
            raise BundleError(f"bundle {directory} runs no model; there is nothing to serve")
        return cls.of(graph, models[0].operator().card)  # the card as the step itself reads it


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

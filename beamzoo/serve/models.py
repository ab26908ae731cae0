"""What the server serves: a model name and version with its served graph.

A zoo model is served as the batch pipeline's ``Classify`` graph; a bundle
as its own graph, under the name and version of its (first) model. Only
``zoo.get``, ``card.ref``, ``card.name``, ``card.version``, ``card.labels``
and ``signature`` below touch a card. The ``Catalog`` of what is served may
change while requests read it (a repository's versions come and go).
"""
from __future__ import annotations

import os
import tempfile
import threading
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
    """Servables by name and version, each with what serves it; a name alone means its newest version.

    Versions come and go while requests read it (``add``, ``remove``): every read is one look
    under its lock, so a reader gets a servable and its service that belong together."""

    def __init__(self, servables: list[Servable] = ()):
        self._lock = threading.Lock()
        self._by_name: dict[str, dict[str, tuple[Servable, object]]] = {}
        for s in servables:
            self.add(s)

    def add(self, servable: Servable, service=None) -> None:
        """Serve ``servable`` (with ``service``); a version already here is refused."""
        with self._lock:
            versions = self._by_name.setdefault(servable.name, {})
            if servable.version in versions:
                raise ValueError(f"model {servable.name} version {servable.version} is given twice")
            versions[servable.version] = (servable, service)

    def remove(self, name: str, version: str | None = None) -> list[tuple[Servable, object]]:
        """Take ``name:version`` (every version of ``name`` without one) out; what was taken."""
        with self._lock:
            self._entry(name, version)  # raises UnknownServable
            versions = self._by_name[name]
            taken = [versions.pop(v) for v in ([version] if version is not None else list(versions))]
            if not versions:
                del self._by_name[name]
            return taken

    def _versions(self, name: str) -> list[str]:
        if name not in self._by_name:
            raise UnknownServable(f"no model named {name!r} is served here; served: "
                                  f"{', '.join(sorted(self._by_name)) or 'none'}")
        return sorted(self._by_name[name], key=version_key)

    def _entry(self, name: str, version: str | None) -> tuple[Servable, object]:
        versions = self._versions(name)
        if version is None:
            return self._by_name[name][versions[-1]]
        if version not in self._by_name[name]:
            raise UnknownServable(f"model {name!r} has no version {version!r} here; served versions: "
                                  f"{', '.join(versions)}")
        return self._by_name[name][version]

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return self._versions(name)

    def entry(self, name: str, version: str | None = None) -> tuple[Servable, object]:
        """(servable, service) of ``name`` (its newest version) or ``name:version``; raises ``UnknownServable``."""
        with self._lock:
            return self._entry(name, version)

    def get(self, name: str, version: str | None = None) -> Servable:
        return self.entry(name, version)[0]

    def entries(self) -> list[tuple[Servable, object]]:
        """Every (servable, service) now, by name and version."""
        with self._lock:
            return [self._by_name[n][v] for n in sorted(self._by_name) for v in self._versions(n)]

    def __iter__(self):
        return iter([s for s, _ in self.entries()])

"""The graphs a tuning run measures, built as the commands that will run its config build them.

``ClassifyGraph``: ``score_images.py``'s graph (one model or a cascade), served as
``beamzoo serve`` serves a model; ``OcrGraph``: ``ocr_images.py``'s; ``BundleGraph``:
an exported bundle's, as ``beamzoo run`` and ``beamzoo serve --bundle`` run it. A
configuration is a dict keyed as the config file is (the commands' flag names):
``model``, ``escalate``, ``escalate_below``, the step knobs, ``workers``, and with
``--serve`` the server's knobs. Each maker says which knobs its command takes
(``knobs``, spelt ``flags``): the tuner tunes those, and only those, that a step of the
built graph declares with values to try.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from beamzoo.bundle import load
from beamzoo.cascade import Cascade
from beamzoo.classify import COMMAND_KNOBS, Classify
from beamzoo.cli_args import FLAG_NAMES
from beamzoo.core.graph import Graph
from beamzoo.ocr import ReadText, ocr_images
from beamzoo.pipeline import score_images
from beamzoo.serve.command import MODEL_KNOBS
from beamzoo.zoo import ModelCard

# score_images.py's knobs of the classifier's steps and the flags of the commands
CLASSIFY_KNOBS, CLASSIFY_FLAGS, OCR_FLAGS = COMMAND_KNOBS, FLAG_NAMES, FLAG_NAMES
BELOW = Cascade.knobs["below"]  # a cascade's threshold: --escalate_below


def _step_knobs(config: dict, knobs: dict, flags: dict) -> dict:
    """The keyword arguments of a graph builder that ``config`` sets."""
    return {name: config[flags.get(name, name)] for name in knobs if flags.get(name, name) in config}


@dataclass
class ClassifyGraph:
    """``score_images(...)`` with ``card`` (or a cascade of it and ``escalate`` at ``below``);
    ``cards``: every card a configuration may name, by reference."""

    card: ModelCard
    escalate: ModelCard | None = None
    below: float | None = None
    cards: dict[str, ModelCard] = field(default_factory=dict)

    kind = "classify"
    answer = "label"  # the column that says what the graph answered
    scope = Classify.default_id  # the composite of the one-model graph
    knobs = CLASSIFY_KNOBS
    flags = CLASSIFY_FLAGS
    serve_knobs = MODEL_KNOBS  # what `beamzoo serve` takes of the model's steps

    def __post_init__(self):
        for c in (self.card, self.escalate):
            if c is not None:
                self.cards.setdefault(c.ref, c)

    def base(self) -> dict:
        """The configuration of the command line itself (every knob at its default)."""
        if self.escalate is None:
            return {"model": self.card.ref}
        below = BELOW.default if self.below is None else self.below
        return {"model": self.card.ref, "escalate": self.escalate.ref, "escalate_below": below}

    def build(self, config: dict, pattern: str, output: str) -> Graph:
        kw = _step_knobs(config, self.knobs, self.flags)
        strong = config.get("escalate")
        if strong:
            kw["below"] = config.get("escalate_below", BELOW.default)
        return score_images(pattern, output, self.cards[config["model"]],
                            escalate=self.cards[strong] if strong else None, **kw)

    def servable(self, config: dict):
        """The served graph of ``config`` (``beamzoo serve --model``: its batch size is --max_batch)."""
        from beamzoo.serve.models import Servable
        return Servable.from_model(self.cards[config["model"]], config.get("max_batch"),
                                   **_step_knobs(config, self.serve_knobs, {}))


@dataclass
class OcrGraph:
    """``ocr_images(...)``: one graph, no model variants."""

    kind = "ocr"
    answer = "text"
    scope = ReadText.default_id
    knobs = ReadText.knobs
    flags = OCR_FLAGS
    serve_knobs: dict = field(default_factory=dict)

    def base(self) -> dict:
        return {}

    def build(self, config: dict, pattern: str, output: str) -> Graph:
        return ocr_images(pattern, output, **_step_knobs(config, self.knobs, self.flags))

    def servable(self, config: dict):
        raise ValueError("beamzoo serve does not serve the OCR graph; leave out --serve with --ocr")


@dataclass
class BundleGraph:
    """An exported bundle: its steps' knobs are in the bundle (signed, maybe), so only the
    runner's (``beamzoo run --workers``) and the server's are tuned."""

    directory: str
    trust: tuple = ()

    answer = "label"
    scope = ""
    knobs: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "classify"

    def base(self) -> dict:
        return {}

    def build(self, config: dict, pattern: str, output: str) -> Graph:
        return load(self.directory, pattern, output, trust=self.trust)

    def servable(self, config: dict):
        from beamzoo.serve.models import Servable
        return Servable.from_bundle(self.directory, self.trust)


__all__ = ["BELOW", "BundleGraph", "CLASSIFY_FLAGS", "CLASSIFY_KNOBS", "ClassifyGraph", "OCR_FLAGS", "OcrGraph"]

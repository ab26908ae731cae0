"""A beamzoo card as a Beam ``ModelHandler``, for ``RunInference`` in an ordinary Beam pipeline.

    from apache_beam.ml.inference.base import RunInference
    from beamzoo.transforms.handler import CardModelHandler

    preds = arrays | RunInference(CardModelHandler("efficientnet_lite0"))

An element is a numpy array shaped as the card's input (no batch axis), or,
for a model with several inputs, a dict {input name: array}. Each element is
checked against the card before batching (a wrong one fails alone, in
``with_exception_handling()``'s ``failed_preprocessing``); the session is made
from the card's verified bytes. A prediction's ``inference`` is the output
array, or a dict {output name: array} for a model with several.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beamzoo.transforms.inference import _session
from beamzoo.zoo import ModelCard, card_of


class ElementMismatch(ValueError):
    """An element that does not fit the card's inputs."""


class CardModelHandler(ModelHandler):
    def __init__(self, model: ModelCard | str | dict, intra_op_threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",), **batching):
        """``batching``: Beam's ``min_batch_size``, ``max_batch_size``, ``max_batch_duration_secs``, ..."""
        super().__init__(**batching)
        self.card = card_of(model)
        self.threads, self.providers = intra_op_threads, tuple(providers)

    def load_model(self):
        return _session(self.card, self.threads, 0, "all", False, self.providers)

    def check(self, element: Any) -> dict[str, np.ndarray]:
        """The element as {input name: array}, or ElementMismatch saying what the card wants."""
        card = self.card
        if not isinstance(element, dict):
            if len(card.inputs) != 1:
                raise ElementMismatch(f"{card.ref} takes {len(card.inputs)} inputs: give a dict "
                                      f"{{{', '.join(t.name for t in card.inputs)}}} of arrays")
            element = {card.inputs[0].name: element}
        names = {t.name for t in card.inputs}
        if set(element) != names:
            raise ElementMismatch(f"{card.ref} takes inputs {sorted(names)}, the element has {sorted(element)}")
        out = {}
        for t in card.inputs:
            x = np.asarray(element[t.name])
            if x.dtype != np.dtype(t.dtype) or len(x.shape) != len(t.shape) or any(
                    s is not None and d != s for d, s in zip(x.shape, t.shape)):
                want = [("any" if s is None else s) for s in t.shape]
                raise ElementMismatch(f"{card.ref} input {t.name!r} takes {t.dtype} {want} (no batch axis); "
                                      f"the element is {x.dtype} {list(x.shape)}")
            out[t.name] = x
        return out

    def get_preprocess_fns(self):
        return [self.check, *super().get_preprocess_fns()]

    def run_inference(self, batch: Sequence[dict[str, np.ndarray]], model, inference_args=None):
        names = [t.name for t in self.card.outputs]
        feeds = {t.name: np.stack([e[t.name] for e in batch]) for t in self.card.inputs}
        ys = model.run(names, feeds)
        for i, element in enumerate(batch):
            example = element if len(element) > 1 else next(iter(element.values()))
            value = ys[0][i] if len(ys) == 1 else {n: y[i] for n, y in zip(names, ys)}
            yield PredictionResult(example, value, model_id=self.card.ref)

    def get_metrics_namespace(self) -> str:
        return "beamzoo"

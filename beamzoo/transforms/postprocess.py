"""Turning logits into labelled predictions."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result, with_columns
from beamzoo.transforms.refresh import followed
from beamzoo.transforms.model import MODEL
from beamzoo.zoo import card_of

PREDICTION_FIELDS = pa.schema([
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_scores", pa.list_(pa.float32())),
    pa.field("model", pa.string()),
])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class TopK(Operator):
    """logits -> label, score, topk_labels, topk_scores, model (softmax scores).

    ``prefix`` names the outputs (``prefix="strong_"`` gives ``strong_label``, ...), so
    two TopK steps in one graph keep both answers. ``model`` is its card's version, or with
    ``model_field`` each row's own (the ``answered_by`` of an OnnxInference with
    ``model_refresh``: the versions it moves to have this card's labels), a column it drops.
    """

    name = "topk"
    default_id = "topk"
    DEFAULT_K = 5
    knobs = {"model": MODEL.but(doc="the model whose labels to use"),
             "k": Knob(None, int, low=1, doc=f"labels kept per image (default {DEFAULT_K}, or all of a model "
                                              "with fewer)"),
             "input_field": Knob("logits", str, doc="the column of scores"),
             "prefix": Knob("", str, doc="of the prediction columns (two TopK steps in one graph need two)"),
             "model_field": Knob(None, str, doc="the column saying which model version answered each row "
                                                "(answered_by, with model_refresh); the model output is taken "
                                                "from it")}
    positional = ("model",)

    def configure(self):
        p = self.params
        self.card, self.input_field = card_of(p["model"]), p["input_field"]
        if not self.card.labels:
            raise ValueError(f"model {self.card.ref} has no labels; TopK needs them")
        self.k = p["k"] if p["k"] is not None else min(self.DEFAULT_K, len(self.card.labels))
        if self.k > len(self.card.labels):
            raise KnobError(f"TopK: k must be between 1 and {len(self.card.labels)} "
                             f"(the model's labels), got {self.k}")
        self.names = {f.name: p["prefix"] + f.name for f in PREDICTION_FIELDS}
        self.model_field = p["model_field"]
        answered_by = [pa.field(self.model_field, pa.string())] if self.model_field is not None else []
        if self.model_field in (self.input_field, *self.names.values()):
            raise KnobError(f"TopK: model_field must name a column of its own, got {self.model_field!r}")
        self.requires = pa.schema([self.card.output.field(self.input_field), *answered_by])
        self.produces = pa.schema([f.with_name(self.names[f.name]) for f in PREDICTION_FIELDS])
        self.consumes = (self.input_field, *(f.name for f in answered_by))
        self._labels = np.array(self.card.labels, dtype=object)

    def result_params(self):
        out = {**super().result_params(), "model": self.card.identity(), "k": self.k}
        if out["model_field"] is None:
            del out["model_field"]  # unset: the fingerprint of a graph made before the knob existed
        else:  # each row names its version; this card's labels are what the step holds to
            out["model"] = followed(self.card)
        return out

    def process(self, batch: pa.RecordBatch) -> Result:
        probs = softmax(batch.column(self.input_field).to_numpy_ndarray().astype(np.float64))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :self.k]
        scores = np.take_along_axis(probs, top, axis=1).astype(np.float32)
        n = batch.num_rows
        produced = {
            "label": pa.array(self._labels[top[:, 0]].tolist() if n else [], pa.string()),
            "score": pa.array(scores[:, 0] if n else [], pa.float32()),
            "topk_labels": pa.array(self._labels[top].tolist() if n else [], pa.list_(pa.string())),
            "topk_scores": pa.array(scores.tolist() if n else [], pa.list_(pa.float32())),
            "model": (batch.column(self.model_field).cast(pa.string()) if self.model_field is not None
                      else pa.array([self.card.ref] * n, pa.string())),
        }
        schema = self.output_schemas([batch.schema])["out"]
        return Result(with_columns(batch, schema, {self.names[k]: v for k, v in produced.items()}),
                      NO_DEAD_LETTERS)

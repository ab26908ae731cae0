"""Turning logits into labelled predictions."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core import NO_DEAD_LETTERS, Operator, Result
from beamzoo.zoo import ModelCard

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
    """logits -> label, score, topk_labels, topk_scores, model (softmax scores)."""

    produces = PREDICTION_FIELDS

    def __init__(self, card: ModelCard, k: int = 5, input_field: str = "logits", name: str = "topk"):
        super().__init__(name)
        if not card.labels:
            raise ValueError(f"model {card.ref} has no labels; TopK needs them")
        if k < 1 or k > len(card.labels):
            raise ValueError(f"k must be between 1 and {len(card.labels)}, got {k}")
        self.card, self.k, self.input_field = card, k, input_field
        self.requires = pa.schema([card.output.field(input_field)])
        self.consumes = (input_field,)
        self._labels = np.array(card.labels, dtype=object)

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
            "model": pa.array([self.card.ref] * n, pa.string()),
        }
        schema = self.output_schema(batch.schema)
        arrays = [produced[f.name] if f.name in produced else batch.column(f.name) for f in schema]
        return Result(pa.record_batch(arrays, schema=schema), NO_DEAD_LETTERS)

    def fingerprint(self):
        return {**super().fingerprint(), "k": self.k, "model": self.card.ref}

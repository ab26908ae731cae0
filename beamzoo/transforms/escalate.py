"""A cascade's route: rows the fast model is unsure of go on to a stronger one."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result
from beamzoo.transforms.deadline import DeadlinePolicy

ESCALATION = pa.field("escalation", pa.string())


class Escalate(Operator):
    """Route rows whose ``field`` (the fast model's score) is below ``below`` to
    ``escalate``, the rest to ``keep``; each gets an ``escalation`` column. A row with a
    ``deadline_at`` that leaves less than ``escalation_s`` is kept (``deadline``)."""

    name = "escalate"
    kind = "route"
    default_id = "confidence"
    knobs = {"below": Knob(0.5, float, low=0.0, high=1.0, tune="deciles",
                           doc="escalate images whose top score (a confidence, 0..1) is below this"),
             "field": Knob("fast_score", str, doc="the fast model's score column"),
             "escalation_s": Knob(0.0, float, low=0.0, unit="seconds",
                                  doc="how long the stronger model takes for an image (with a deadline)")}
    positional = ("below",)
    ports = ("escalate", "keep")

    def configure(self):
        self.requires = pa.schema([pa.field(self.params["field"], pa.float32())])
        self.policy = DeadlinePolicy(self.params["escalation_s"])

    def output_schemas(self, inputs):
        schema = pa.schema([*inputs[0], ESCALATION])
        return {"escalate": schema, "keep": schema}

    def process(self, batch):
        unsure = batch.column(self.params["field"]).to_numpy(zero_copy_only=False) < self.params["below"]
        late = np.zeros(batch.num_rows, bool)
        if "deadline_at" in batch.schema.names:
            t = self.ctx.now()
            at = batch.column("deadline_at").to_numpy(zero_copy_only=False)
            late = np.array([not self.policy.can_escalate(a, t) for a in at], bool)
        up = unsure & ~late
        marks = np.where(up, "escalated", np.where(unsure, "deadline", "not_needed"))
        marked = batch.append_column(ESCALATION, pa.array(marks.tolist(), pa.string()))
        return Result({"escalate": marked.filter(pa.array(up)), "keep": marked.filter(pa.array(~up))},
                      NO_DEAD_LETTERS)


__all__ = ["ESCALATION", "Escalate"]

"""Per-record deadlines.

``Deadline(seconds=2)`` stamps each row with ``deadline_at`` (seconds since the
epoch, by the run's clock); a row may carry its own budget in a column
(``Deadline(field="budget_s")``, e.g. from a manifest). ``DeadlineCheck``
before a model dead-letters, with stage ``deadline``, the rows whose deadline
passed before they had any answer. A cascade asks ``DeadlinePolicy`` whether a
row has time to be escalated; one that has not keeps its fast answer, marked.

The clock is the run context's (``run(..., clock=...)``), so the policy and the
steps are tested without sleeping; on workers of other processes it is the
real clock.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.op import Operator, Result, dead_letters

DEADLINE_AT = pa.field("deadline_at", pa.float64())


@dataclass(frozen=True)
class DeadlinePolicy:
    """What a row with ``deadline_at`` may still do at time ``now``.

    ``escalation_s``: how long a second model takes for a row (its answer must
    arrive before the deadline).
    """

    escalation_s: float = 0.0

    def expired(self, deadline_at: float, now: float) -> bool:
        return now > deadline_at

    def can_escalate(self, deadline_at: float, now: float) -> bool:
        return now + self.escalation_s <= deadline_at


class Deadline(Operator):
    """Stamp ``deadline_at`` = now + ``seconds`` (or + the row's ``field``, a budget in
    seconds; a null budget falls back to ``seconds``)."""

    name = "deadline"
    default_id = "deadline"
    knobs = {"seconds": Knob(2.0, float, low=0.0, unit="seconds",
                             doc="each row's deadline, this many seconds after it is listed"),
             "field": Knob(None, str, doc="a column with each row's own budget in seconds")}
    positional = ("seconds",)
    requires = pa.schema([])
    produces = pa.schema([DEADLINE_AT])

    def output_schemas(self, inputs):
        f = self.params["field"]
        if f is not None and (f not in inputs[0].names or not pa.types.is_floating(inputs[0].field(f).type)
                              and not pa.types.is_integer(inputs[0].field(f).type)):
            raise KnobError(f"Deadline step {self.id!r}: field {f!r} must be a numeric column of its input "
                            f"(seconds); the input has: {', '.join(inputs[0].names)}")
        return super().output_schemas(inputs)

    def process(self, batch):
        n, t = batch.num_rows, self.ctx.now()
        budget = np.full(n, self.params["seconds"])
        if self.params["field"]:
            given = batch.column(self.params["field"]).cast(pa.float64()).to_numpy(zero_copy_only=False)
            budget = np.where(np.isnan(given), budget, given)
        return Result(batch.append_column(DEADLINE_AT, pa.array(t + budget, pa.float64())),
                      dead_letters(batch, [], self.id, []))


class DeadlineCheck(Operator):
    """Dead-letter (stage ``deadline``) the rows whose deadline has passed, before
    ``before`` (the step that would answer them) runs."""

    name = "deadline_check"
    default_id = "deadline_check"
    knobs = {"before": Knob("", str, results=False, doc="the step the rows were waiting for")}
    requires = pa.schema([DEADLINE_AT])

    def process(self, batch):
        t = self.ctx.now()
        at = batch.column("deadline_at").to_numpy(zero_copy_only=False)
        late = np.flatnonzero(t > at)
        if not len(late):
            return Result(batch, dead_letters(batch, [], "deadline", []))
        keep = np.flatnonzero(~(t > at))
        before = f" before {self.params['before']} answered" if self.params["before"] else ""
        errors = [f"DeadlineMissed: the deadline passed {t - at[i]:.3f} s ago{before}" for i in late]
        return Result(batch.take(pa.array(keep, pa.int64())),
                      dead_letters(batch, late.tolist(), "deadline", errors))


__all__ = ["DEADLINE_AT", "Deadline", "DeadlineCheck", "DeadlinePolicy"]

"""The dead-letter limit: a run whose steps only fail stops, and says why.

As Beam's ``with_exception_handling(threshold=...)``: when a step dead-letters
more than ``max_fraction`` of its rows, the run stops reading inputs (once the
step has seen ``min_rows`` rows, 500, so a few hundred bad files at the start do not
stop a long run), commits what it has, and fails with ``TooManyDeadLetters`` naming
the step and the commonest reason. At the end every step is checked, whatever
its count, so a broken model fails a run of twelve images as it fails one of a
million. The default (0.99) catches "every row failed at the same step";
``max_fraction=1`` turns the limit off.
"""
from __future__ import annotations

from beamzoo.core.context import Hooks, RunContext
from beamzoo.core.knobs import Knob
from beamzoo.core.metrics import StepMetrics

MAX_DEAD_FRACTION = Knob(0.99, float, low=0.0, high=1.0, results=False,
                         doc="stop, and fail, when a step dead-letters more than this fraction of its rows "
                             "(every row failing at one step; 1 turns it off)")
DEFAULT_MAX_FRACTION = MAX_DEAD_FRACTION.default


class TooManyDeadLetters(RuntimeError):
    """A step dead-lettered more of its rows than the limit allows."""

    def __init__(self, step: str, m: StepMetrics, max_fraction: float):
        self.step, self.dead, self.rows, self.max_fraction = step, m.dead, m.rows_in, max_fraction
        common = m.commonest()
        why = f"; the commonest reason ({common[1]} of them): {common[0]}" if common else ""
        super().__init__(f"step {step!r} dead-lettered {m.dead} of its {m.rows_in} rows ({m.dead / m.rows_in:.0%}), "
                         f"over the limit of {max_fraction:.0%}{why}. What was done is committed, the dead "
                         f"letters too; raise the limit with --max_dead_fraction (1 turns it off)")


class DeadLetterLimit(Hooks):
    def __init__(self, max_fraction: float = DEFAULT_MAX_FRACTION, min_rows: int = 500):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be between 0 and 1, got {max_fraction!r}")
        self.max_fraction, self.min_rows = max_fraction, min_rows

    def over(self, step: str, m: StepMetrics, min_rows: int = 1) -> TooManyDeadLetters | None:
        if self.max_fraction >= 1.0 or m.rows_in < max(1, min_rows) or m.dead <= self.max_fraction * m.rows_in:
            return None
        return TooManyDeadLetters(step, m, self.max_fraction)

    def batch_done(self, ctx: RunContext, step: str, kind: str, sample) -> None:
        if sample.dead:
            failure = self.over(step, ctx.steps[step], self.min_rows)
            if failure is not None:
                ctx.request_stop(str(failure), failure)

    def check(self, steps: dict[str, StepMetrics]) -> TooManyDeadLetters | None:
        """The first step over the limit at the end of a run, or None."""
        return next((f for f in (self.over(s, m) for s, m in steps.items()) if f is not None), None)


__all__ = ["DEFAULT_MAX_FRACTION", "MAX_DEAD_FRACTION", "DeadLetterLimit", "TooManyDeadLetters"]

"""Keeping each step within its latency budget while a run goes on (``--adapt``).

An ``Adapter`` is a run hook. It watches each budgeted step's latency, the wall
seconds per row of its last ``window`` batches (from the ``Sample`` every
executor reports), and moves speed knobs, each a ``Lever`` (a batch size, the
rows per task, a serving delay), one value at a time within the values the
knob declares for tuning (``Knob.candidates``) or, where it declares none,
within half and double twice of where it started. Only knobs declared
``results=False`` can be levers: what a run answers never changes.

Per step, once a full window has come since the last change that touches it:

- over ``over`` x its budget: the first lever that can still move goes one value
  its ``faster`` way (a smaller batch, say); where that way did not help, the
  other way;
- the next window judges the move: kept where the latency fell by ``GAIN`` (and
  where it is still over, the next move follows at once), else moved back, and
  that way is not tried again for the step until it is well under its budget;
- well under (``under`` x its budget): the last move kept is undone, back toward
  the tuned (cheaper) values; never beyond where a lever started;
- a move that did not help, or that redoes one just undone, doubles the windows
  the step waits before it decides again (up to ``MAX_PATIENCE``): it does not
  flap, and where no knob helps it soon stops trying;
- a step without a budget gets ``SLACK`` x the latency of its first window (or
  none, where its batches take less than ``QUICK``: too quick to time), and is
  left alone while its first window is less than ``MINOR`` of those of all
  such steps (a small part of a row's time, and the noisiest);
- each thread's first batch of a step is its warm-up (a model loading, caches
  filling) and is not counted.

Every change is a ``Change``: one line (``say``), ``ctx.note(step, "adapt", [...])``
and the count ``adapt changes`` (both in the run's stats and ``--profile``), and
the ``on_change`` callbacks (serving's Prometheus series).

>>> from beamzoo.core.knobs import Knob
>>> size = Knob(16, int, low=1, results=False, tune=(4, 8, 16, 32))
>>> lever = Lever("batch_size", size, 16, apply=lambda v: None, steps={"infer"})
>>> lever.values, lever.next(-1), lever.next(+1)
((4, 8, 16, 32), 8, 32)
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from beamzoo.core.context import Hooks, RunContext
from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.metrics import Sample

WINDOW = 8  # batches a decision reads, and at least between two changes of a step
OVER, UNDER = 1.2, 0.5  # x the budget: move toward latency above, back toward efficiency below
SLACK = 1.5  # a step without a budget: this x the latency of its first window
GAIN = 0.1  # a move is kept where the latency fell by this fraction at least
QUICK = 0.001  # a step whose batches take less (wall seconds) is too quick to time: no budget of its own
MINOR = 0.1  # without budgets, a step with less than this share of the watched steps' time is left alone
MAX_PATIENCE = 8  # windows a step waits between decisions at most (doubled where a try failed or it flapped)
WATCHED = ("map", "explode", "route")  # the kinds of step that get a budget of their own

log = logging.getLogger("beamzoo.adapt")


def ladder(knob: Knob, start, cores: int | None = None) -> tuple:
    """The values a lever moves through, lowest first: the knob's ``tune`` values and ``start``;
    for a knob that declares none, ``start`` halved and doubled twice, within its domain."""
    values = set(knob.candidates(cores or os.cpu_count() or 1))
    if not values:
        near = (start * 2.0 ** k for k in (-2, -1, 1, 2))
        values = {int(round(v)) if knob.type is int else v for v in near}
    values.add(start)
    return tuple(sorted(v for v in values if _fits(knob, v)))


def _fits(knob: Knob, value) -> bool:
    try:
        knob.check("", "", value)
        return True
    except KnobError:
        return False


class Lever:
    """One speed knob the adapter may move. ``name``: as its owner declares it; ``knob``: the
    declaration (one with ``results=True`` is refused); ``value``: where it starts; ``apply(v)``:
    what moves it in the running thing; ``steps``: the step ids whose latency it moves (None:
    every step); ``faster``: the way tried first to cut latency (-1: lower values)."""

    def __init__(self, name: str, knob: Knob, value, apply: Callable[[Any], None],
                 steps: Iterable[str] | None = None, faster: int = -1, cores: int | None = None):
        if knob.results:
            raise KnobError(f"adapt: {name} changes results; only speed knobs (declared results=False) "
                            "may move while running")
        if faster not in (-1, 1):
            raise ValueError(f"adapt: faster is -1 or 1, got {faster!r}")
        self.name, self.knob, self.apply, self.faster = name, knob, apply, faster
        self.value = knob.check("adapt", name, value)
        self.values = ladder(knob, self.value, cores)
        self.steps = None if steps is None else frozenset(steps)

    def serves(self, step: str) -> bool:
        return self.steps is None or step in self.steps

    def next(self, way: int):
        """The value one step ``way`` (-1 lower, +1 higher) from where it is, or None at a bound."""
        lower = [v for v in self.values if v < self.value]
        higher = [v for v in self.values if v > self.value]
        if way < 0:
            return lower[-1] if lower else None
        return higher[0] if higher else None

    def __repr__(self):
        return f"Lever({self.name}={self.value!r})"


@dataclass
class Change:
    """One move of one lever, for one step's latency."""

    step: str
    knob: str
    old: Any
    new: Any
    reason: str  # over its budget, did not help, well under its budget
    latency_s: float  # seconds per row, of the window that decided
    budget_s: float
    batch: int  # the step's batches so far
    at_s: float  # seconds since the adapter's first batch, by the run's clock

    def to_dict(self) -> dict:
        return {"knob": self.knob, "from": self.old, "to": self.new, "reason": self.reason,
                "ms_per_row": round(self.latency_s * 1000, 4), "budget_ms": round(self.budget_s * 1000, 4),
                "batch": self.batch, "at_s": round(self.at_s, 3)}


@dataclass
class _Step:
    """What the adapter knows of one step."""

    budget: float | None
    window: deque
    batches: int = 0
    seen: int = 0  # batches since the last decision or change that touched it
    patience: int = 1  # windows to wait between decisions (doubles where it flaps)
    trial: tuple | None = None  # (lever, way, latency before) of a move being judged
    kept: list = field(default_factory=list)  # (lever, way) of the moves kept, the newest last
    blocked: set = field(default_factory=set)  # (lever, way) that did not help
    undone: tuple | None = None  # (lever, way) of the last move undone
    stuck: bool = False  # said that nothing can move
    said: bool = False  # said what budget it keeps to (one it was not given)

    def latency(self) -> float:
        rows = sum(r for _, r in self.window)
        return sum(w for w, _ in self.window) / rows

    def fresh(self) -> None:
        self.window.clear()
        self.seen = 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


class Adapter(Hooks):
    """Keeps the budgeted steps within ``budgets`` ({step id: seconds per row}; without any,
    every map, explode and route step gets ``SLACK`` x its first window) by moving ``levers``.
    ``say``: where each change's line goes (default: the ``beamzoo.adapt`` logger);
    ``on_change``: called with each ``Change``; ``changes``: every change so far."""

    def __init__(self, levers: list[Lever], budgets: dict[str, float] | None = None, window: int = WINDOW,
                 over: float = OVER, under: float = UNDER, say: Callable[[str], None] | None = None,
                 on_change: Iterable[Callable[[Change], None]] = ()):
        if window < 1 or not 0 < under < 1 < over:
            raise ValueError("adapt: window must be >= 1, and under < 1 < over")
        self.levers = list(levers)
        self.budgets = check_budgets("adapt", budgets)
        self.window, self.over, self.under = window, over, under
        self.say = say or log.warning
        self.on_change = list(on_change)
        self.changes: list[Change] = []
        self.steps: dict[str, _Step] = {}
        self.quick: set[str] = set()  # steps too quick to time (no budget was given them)
        self._skip: set[str] = set()  # steps it does not keep to a budget
        self._first: dict[str, float] = {}  # step -> its first window's seconds per row (no budget given)
        self._warm: set[tuple[str, int]] = set()  # (step, thread) that ran their first batch
        self._t0: float | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the hooks
    def run_started(self, ctx: RunContext, plan) -> None:
        ctx.count("adapt changes", 0)
        self.known(s.id for s in plan.graph.steps)

    def known(self, steps: Iterable[str]) -> None:
        """Say which budgets name no step of the graph (they are ignored)."""
        ids = set(steps)
        for step in sorted(set(self.budgets) - ids):
            self.say(f"adapt: no step {step!r} in this graph; its budget is ignored "
                     f"(its steps: {', '.join(sorted(ids))})")

    def batch_done(self, ctx: RunContext, step: str, kind: str, sample: Sample) -> None:
        if sample.rows_in <= 0 or sample.batches <= 0:
            return  # a wait, a collect's children: no batch run
        with self._lock:
            if self._t0 is None:
                self._t0 = ctx.now()
            s = self.steps.get(step)
            if s is None:
                s = self._watch(step, kind)
                if s is None:
                    return
                if s.budget is not None:
                    ctx.note(step, "adapt budget_s", s.budget)
            thread = (step, threading.get_ident())
            if thread not in self._warm:  # a thread's first batch of a step loads and warms caches
                self._warm.add(thread)
                return
            s.window.append((sample.wall_s, sample.rows_in))
            s.batches += 1
            s.seen += 1
            if len(s.window) == self.window and s.seen >= self.window * s.patience:
                self._decide(ctx, step, s)

    def _watch(self, step: str, kind: str) -> _Step | None:
        """The state of a step the adapter keeps to a budget (None: it does not)."""
        if step in self.quick or step in self._skip:
            return None
        if not any(lever.serves(step) for lever in self.levers) or (
                step not in self.budgets if self.budgets else kind not in WATCHED):
            self._skip.add(step)
            return None
        s = self.steps[step] = _Step(self.budgets.get(step), deque(maxlen=self.window))
        return s

    # ---------------------------------------------------------------- deciding
    def _decide(self, ctx: RunContext, step: str, s: _Step) -> None:
        latency, n = s.latency(), len(s.window)
        if s.budget is None:
            if sum(w for w, _ in s.window) / n < QUICK:
                del self.steps[step]
                self.quick.add(step)
                return
            s.budget = latency * SLACK
            self._first[step] = latency
            ctx.note(step, "adapt budget_s", s.budget)
            s.fresh()
            return
        if step in self._first:
            if self._first[step] < MINOR * sum(self._first.values()):
                s.fresh()  # a small part of a row's time: leave it be
                return
            if not s.said:
                s.said = True
                self.say(f"adapt: {step} has no budget: keeping it within {SLACK:g} x its first {n} batches' "
                         f"{_ms(self._first[step])}/row = {_ms(s.budget)}/row")
        ratio = latency / s.budget
        if s.trial is not None:
            lever, way, before = s.trial
            s.trial = None
            if latency >= before * (1 - GAIN):
                s.blocked.add((lever, way))
                s.patience = min(2 * s.patience, MAX_PATIENCE)  # a try that failed: wait longer before the next
                self._move(ctx, step, s, lever, -way, f"did not help ({_ms(latency)}/row, {_ms(before)} before)",
                           latency)
                return
            s.kept.append((lever, way))
            if ratio <= self.over:
                s.fresh()  # kept; within the budget or under it, the next window says what comes next
                return
        if ratio > self.over:
            self._faster(ctx, step, s, latency, n)
        elif ratio < self.under:
            if s.kept and not self._judged(s.kept[-1][0], step, s):
                lever, way = s.kept.pop()
                s.undone = (lever, way)
                self._move(ctx, step, s, lever, -way,
                           f"well under its budget ({_ms(latency)}/row < {self.under:g} x {_ms(s.budget)} "
                           f"for {n} batches)", latency)
            s.blocked.clear()
            s.stuck = False
        elif ratio <= 1:
            s.stuck = False

    def _faster(self, ctx: RunContext, step: str, s: _Step, latency: float, n: int) -> None:
        why = f"over its budget ({_ms(latency)}/row > {_ms(s.budget)} for {n} batches)"
        busy = False
        for lever in self.levers:
            if not lever.serves(step):
                continue
            if self._judged(lever, step, s):
                busy = True  # another step's move is being judged: that comes first
                continue
            way = lever.faster if (lever, lever.faster) not in s.blocked else -lever.faster
            if (lever, way) in s.blocked or lever.next(way) is None:
                continue
            if s.undone == (lever, way):  # back where it was undone from: wait longer before the next
                s.patience = min(2 * s.patience, MAX_PATIENCE)
            s.undone = None
            self._move(ctx, step, s, lever, way, why, latency)
            s.trial = (lever, way, latency)
            return
        if not s.stuck and not busy:
            s.stuck = True
            self.say(f"adapt: {step} {why}, and no speed knob can move further within its bounds")
        s.fresh()

    def _judged(self, lever: Lever, step: str, s: _Step) -> bool:
        """Whether another step's move waits for its judgement that moving ``lever`` for ``step``
        would spoil: it moved what ``step`` measures, or ``lever`` moves what it measures."""
        return any(t is not s and t.trial is not None and (t.trial[0].serves(step) or lever.serves(t_id))
                   for t_id, t in self.steps.items())

    def _move(self, ctx: RunContext, step: str, s: _Step, lever: Lever, way: int, why: str,
              latency: float) -> None:
        new = lever.next(way)
        if new is None:  # another step's change moved it to a bound already
            s.fresh()
            return
        old = lever.value
        lever.apply(new)
        lever.value = new
        reason = why.split(" (", 1)[0]
        change = Change(step, lever.name, old, new, reason, latency, s.budget, s.batches, ctx.now() - self._t0)
        self.changes.append(change)
        for t_id, t in self.steps.items():  # what they measured was of the old value
            if lever.serves(t_id):
                if t is not s and t.trial is not None:
                    t.kept.append(t.trial[:2])  # judged no more: another step moved what it measures
                    t.trial = None
                t.fresh()
        self.say(f"adapt: {step} {why}: {lever.name} {lever.knob.show(old)} -> {lever.knob.show(new)}")
        ctx.count("adapt changes")
        ctx.note(step, "adapt", [c.to_dict() for c in self.changes if c.step == step])
        for f in self.on_change:
            f(change)


def check_budgets(owner: str, budgets) -> dict[str, float]:
    """``budgets`` ({step id: seconds per row}) checked; KnobError in one line naming the step."""
    if budgets is None:
        return {}
    if not isinstance(budgets, dict):
        raise KnobError(f"{owner}: budgets must be a mapping of step id -> seconds per row, got {budgets!r}")
    out = {}
    for step, seconds in budgets.items():
        if not isinstance(step, str) or not step:
            raise KnobError(f"{owner}: budgets: step ids are text, got {step!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                math.isfinite(seconds) and seconds > 0):
            raise KnobError(f"{owner}: budgets: {step} must be a positive number of seconds per row, "
                            f"got {seconds!r}")
        out[step] = float(seconds)
    return out


__all__ = ["Adapter", "Change", "Lever", "check_budgets", "ladder"]

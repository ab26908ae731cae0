"""A run's context: what one run shares, instead of process-global state.

A ``RunContext`` carries the run's id, its clock (injectable: tests stand
time still), a clean stop (a gate asks for no more inputs; a dead-letter
limit stops a run that only fails), the per-step metrics every executor
reports into (``record``), a step's own counts (``count``), and the process's
shared resources (``shared``: models and worker pools, made once per process).
Two runs in one process have two contexts and share nothing but resources.

``Hooks`` are called by every executor, as Hamilton's lifecycle hooks are:
``run_started`` with the compiled plan, ``batch_done`` after each batch of
each step, ``run_ended`` with the stats. The progress bar, the dead-letter
limit and serving's Prometheus series are hooks.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable

from beamzoo.core import resources
from beamzoo.core.metrics import Sample, StepMetrics


def run_id() -> str:
    """Sorts by start time; unique across processes."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class Hooks:
    """Override what you need; every executor calls these."""

    def run_started(self, ctx: RunContext, plan) -> None:
        """Before the first batch (``plan``: the compiled plan)."""

    def batch_done(self, ctx: RunContext, step: str, kind: str, sample: Sample) -> None:
        """After one batch of one step (from the thread that ran it)."""

    def run_ended(self, ctx: RunContext, stats) -> None:
        """After the last batch, before the executor returns ``stats``."""


class RunContext:
    """One run's shared state. ``clock``: seconds since the epoch (default ``time.time``)."""

    def __init__(self, run: str | None = None, clock: Callable[[], float] | None = None,
                 hooks: list[Hooks] = (), holds: bool = False):
        self.run_id = run or run_id()
        self.holds = holds  # what it shares is given back by ``release`` (else kept for the process)
        self.clock = clock or time.time
        self.hooks = list(hooks)
        self.steps: dict[str, StepMetrics] = {}
        self.counters: dict[str, int] = {}
        self.notes: dict[str, dict[str, Any]] = {}
        self.failure: BaseException | None = None  # why the run must fail once it has committed
        self._stop: str | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- time and stopping
    def now(self) -> float:
        return self.clock()

    def request_stop(self, reason: str, failure: BaseException | None = None) -> None:
        """Read no more inputs; what was read is answered and committed (the first reason wins).
        With ``failure``, the run fails with it once committed."""
        with self._lock:
            if self._stop is None:
                self._stop = reason
                self.failure = failure

    @property
    def stop_reason(self) -> str | None:
        return self._stop

    # ---------------------------------------------------------------- what the run reports
    def record(self, step: str, kind: str, sample: Sample) -> None:
        """One batch of ``step`` (a ``kind`` primitive): into its metrics, then to the hooks."""
        with self._lock:
            m = self.steps.get(step)
            if m is None:
                m = self.steps[step] = StepMetrics(kind)
            m.add(sample)
        for h in self.hooks:
            h.batch_done(self, step, kind, sample)

    def count(self, name: str, n: int = 1) -> None:
        """A step's own count (a gate's rows held, the rows an endpoint answered); a count of 0
        is a count too (a gate that held no row says so)."""
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def note(self, step: str, key: str, value: Any) -> None:
        """A fact about a step (the providers a session asked onnxruntime for, say)."""
        with self._lock:
            self.notes.setdefault(step, {})[key] = value

    def started(self, plan) -> None:
        for h in self.hooks:
            h.run_started(self, plan)

    def ended(self, stats) -> None:
        for h in self.hooks:
            h.run_ended(self, stats)

    # ---------------------------------------------------------------- resources
    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """The one object for ``key`` in this process (a model session, a worker pool)."""
        return resources.shared(key, make, self if self.holds else None)

    def release(self) -> int:
        """Give back what a holding context shared (a served version retired); how many objects
        no one else used are forgotten."""
        return resources.release(self) if self.holds else 0


class _Standalone(RunContext):
    """The context of an operator used outside any run (a test calling ``process``): the real
    clock, shared resources, nothing recorded and no one to stop."""

    def record(self, step, kind, sample):
        pass

    def count(self, name, n=1):
        pass

    def note(self, step, key, value):
        pass

    def request_stop(self, reason, failure=None):
        pass


STANDALONE = _Standalone("standalone")

__all__ = ["Hooks", "RunContext", "STANDALONE", "run_id"]

"""The one interface every executor implements, over a compiled plan.

An executor says which primitives it runs (``kinds``), whether it can stop
reading part-way (``can_stop``: a gate's stop, a dead-letter limit mid-run),
which compiler passes its plans get (``passes``), and runs a plan in a run
context (``execute``), with the shared kernels (``beamzoo.core.kernels``)
doing each step's work and recording its metrics. ``stats`` turns the context's
per-step metrics into a run's ``RunStats``. Executors register by name in
``beamzoo.runners.registry``.
"""
from __future__ import annotations

import time

from beamzoo.core.compile import STANDARD, Pass, Plan, check_kinds, compile
from beamzoo.core.context import RunContext
from beamzoo.core.graph import DEAD, Graph, GraphError
from beamzoo.core.metrics import RunStats
from beamzoo.core.op import PRIMITIVES


class Executor:
    name = ""
    kinds: frozenset = frozenset(PRIMITIVES)
    formats: frozenset = frozenset()  # the sink formats it writes
    can_stop = True

    def passes(self) -> tuple[Pass, ...]:
        """The compiler passes this executor's plans get, after the run's own (resume keys)."""
        return STANDARD

    def compile(self, graph: Graph, before: tuple[Pass, ...] = ()) -> Plan:
        """``graph`` compiled with ``before`` (a run's own passes) and this executor's passes."""
        return compile(graph, (*before, *self.passes()))

    def check(self, plan: Plan) -> None:
        """Refuse a plan this executor cannot run: an unknown primitive, a step that would stop
        the run where it cannot stop."""
        check_kinds(plan, self.kinds, self.name)
        for s in plan.graph.steps:
            if s.kind == "sink" and s.operator().format not in self.formats:
                raise GraphError(f"sink {s.id!r} writes {s.operator().format!r}, which {self.name} does not write "
                                 f"(it writes {', '.join(sorted(self.formats))})")
        if not self.can_stop:
            for s in plan.graph.steps:
                op = s.operator()  # every kind is known by now
                if op.stops_run():
                    raise GraphError(
                        f"step {s.id!r} ({op.params.get('spec') or s.op}) may stop the run part-way: that needs the "
                        f"edge runner (--runner=EdgeRunner); {self.name} cannot stop reading inputs part-way and "
                        "keep what it wrote, so use a step that does not stop there (a gate's warn or divert)")

    def execute(self, plan: Plan, ctx: RunContext) -> RunStats:
        raise NotImplementedError

    def run(self, graph: Graph, ctx: RunContext | None = None) -> RunStats:
        """Compile ``graph`` with this executor's passes and run it (``execute`` checks the plan)."""
        return self.execute(self.compile(graph), ctx or RunContext())


def stats(plan: Plan, ctx: RunContext, seconds: float, first_result_s: float | None = None,
          runner: str = "") -> RunStats:
    """A run's totals from its per-step metrics: inputs listed by the sources, rows written by
    each sink (``scored``: by the sinks of answers, not of dead letters), dead letters, rows
    skipped (a resume's)."""
    steps = dict(ctx.steps)
    s = RunStats(seconds=seconds, first_result_s=first_result_s, steps=steps, stages=plan.layout(),
                 counters=dict(ctx.counters), stopped=ctx.stop_reason, runner=runner,
                 notes={k: dict(v) for k, v in ctx.notes.items()})
    for st in plan.graph.steps:
        m = steps.get(st.id)
        if m is None:
            continue
        if st.kind == "source":
            s.inputs += m.rows_in
        if st.kind == "sink":
            s.written[st.id] = m.rows_in
            if DEAD not in st.inputs:
                s.scored += m.rows_in
        s.failed += m.dead
        s.skipped += m.skipped
    return s


def kernel_table(table: dict):
    """A decorator filing an executor's function for a stage under primitive kinds in ``table``:
    ``@kernel("route", "explode")``."""
    def kernel(*kinds):
        def deco(fn):
            for kind in kinds:
                table[kind] = fn
            return fn
        return deco
    return kernel


class Clock:
    """Seconds since a start, for ``first_result_s`` and ``seconds``."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


__all__ = ["Clock", "Executor", "kernel_table", "stats"]

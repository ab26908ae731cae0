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
from beamzoo.core.graph import DEAD, Graph, GraphError, Step, split_ref
from beamzoo.core.metrics import RunStats, StepMetrics
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
    """A run's totals from its per-step metrics, per input (``RunStats`` says how), and the
    rows written by each sink."""
    steps = dict(ctx.steps)
    s = RunStats(seconds=seconds, first_result_s=first_result_s, steps=steps, stages=plan.layout(),
                 counters=dict(ctx.counters), stopped=ctx.stop_reason, runner=runner,
                 notes={k: dict(v) for k, v in ctx.notes.items()})
    graph, none = plan.graph, StepMetrics()
    line = input_line(graph)
    for st in graph.steps:
        m = steps.get(st.id, none)
        if st.kind == "sink":
            s.written[st.id] = m.rows_in
            if DEAD in st.inputs:
                s.dead_sinks.append(st.id)
        if st.id not in line:
            continue
        if st.kind == "source":
            s.inputs += m.rows_in
        s.failed += m.dead
        s.skipped += m.skipped
        for port in line[st.id]:
            s.dropped += m.ports.get(port, 0) if st.kind == "route" else m.rows_out
    s.scored = s.inputs - s.failed - s.skipped - s.dropped
    return s


def input_line(graph: Graph) -> dict[str, list[str]]:
    """The steps an input is followed through, each with its ports that no step reads (rows
    there reach no sink). From a source the line runs along every port but a one-to-many
    step's children (``out``; its ``parents`` go on); where several steps read one port, it
    runs on to the first that is not a sink (the others get copies); steps after the dead
    letters are off it."""
    on: dict[str, list[str]] = {}
    for st in graph.steps:
        if DEAD in st.inputs:
            continue
        if st.kind != "source" and not any(_followed(graph, on, st, r) for r in st.inputs):
            continue
        ports = [split_ref(r)[1] for r in graph.schemas if split_ref(r)[0] == st.id]
        unread = [p for p in ports if not graph.consumers(f"{st.id}:{p}")]
        if st.kind == "explode":  # its parents are answered by its children where none reads them
            unread = [] if "out" not in unread else [p for p in unread if p == "parents"]
        on[st.id] = unread
    return on


def _followed(graph: Graph, on: dict, step: Step, ref: str) -> bool:
    """Whether the input line runs from ``ref`` into ``step``."""
    sid, port = split_ref(ref)
    if sid not in on or (graph.step(sid).kind == "explode" and port == "out"):
        return False
    readers = graph.consumers(ref)
    main = next((r for r in readers if r.kind != "sink"), readers[0])
    return main.id == step.id


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

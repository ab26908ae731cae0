"""The in-thread runner: a plan run in the calling thread, one batch at a time.

``Engine`` holds one thread's operators for a plan (heavy state shared per
process) and runs a batch through every stage in order with the shared
kernels: serving runs each batch of requests so (``beamzoo.serve``), and a
cascade's calibration runs its sample so. Its sinks keep their rows in memory
(``format = "memory"``): ``Engine.run`` hands back each sink's rows and every
dead letter. ``InlineRunner`` runs a whole plan whose sources list their
inputs, in chunks, and keeps what its sinks got (``answers``, ``dead``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from beamzoo.core.compile import Plan
from beamzoo.core.context import RunContext
from beamzoo.core.executor import Clock, Executor, stats
from beamzoo.core.graph import DEAD
from beamzoo.core.kernels import Collector, record_sink, run_map, run_merge, run_ports, run_source
from beamzoo.core.metrics import RunStats


@dataclass
class Answer:
    """What a plan made of a batch: each sink's rows (by sink step id), and every dead letter."""

    rows: dict[str, list[pa.RecordBatch]] = field(default_factory=dict)
    dead: list[pa.RecordBatch] = field(default_factory=list)

    def by_id(self, step: str, fields: list[str] | None = None) -> dict[str, dict]:
        """The rows sink ``step`` got, by id (each its ``fields``, default all but the id)."""
        out: dict[str, dict] = {}
        for b in self.rows.get(step, ()):
            names = ["id", *(fields if fields is not None else [n for n in b.schema.names if n != "id"])]
            for r in b.select(names).to_pylist():
                out[r.pop("id")] = r
        return out

    def errors(self) -> dict[str, tuple[str, str]]:
        """(stage, reason) of every dead letter, by id."""
        out = {}
        for d in self.dead:
            for i, stage, error in zip(d.column("id").to_pylist(), d.column("stage").to_pylist(),
                                       d.column("error").to_pylist()):
                out[i] = (stage, error)
        return out


class Engine:
    """One thread's operators for ``plan``, run on one batch at a time."""

    def __init__(self, plan: Plan, ctx: RunContext):
        self.plan, self.ctx = plan, ctx
        self.ops = {st.id: [op.bind(ctx) for op in st.operators()] for st in plan.stages}
        for st in plan.stages:
            if st.kind in ("merge", "collect"):
                self.ops[st.id][0].output_schemas([plan.graph.schema(r) for r in st.steps[0].inputs])

    def run(self, batch: pa.RecordBatch, source: str | None = None) -> Answer:
        """``batch`` through the plan, as the rows of source ``source`` (default: the first)."""
        source = source or next(st.id for st in self.plan.stages if st.kind == "source")
        ports: dict[str, list[pa.RecordBatch]] = {f"{source}:out": [batch]}
        answer = Answer()
        for st in self.plan.stages:
            if st.kind == "source":
                continue
            ops = self.ops[st.id]
            ins = [(i, b) for i, r in enumerate(st.inputs) if r != DEAD for b in ports.get(r, ())]
            if DEAD in st.inputs:
                ins += [(st.inputs.index(DEAD), d) for d in answer.dead]
            if st.kind == "sink":
                for _, b in ins:
                    record_sink(self.ctx, ops[0], b.num_rows, 0.0, 0.0)
                    answer.rows.setdefault(st.steps[0].id, []).append(b)
                continue
            outs: list[tuple[str, pa.RecordBatch]] = []
            if st.kind == "collect":
                outs = self._collect(ops[0], ins, answer.dead)
            for _, b in ins if st.kind != "collect" else ():
                if b.num_rows == 0:
                    continue
                if st.kind == "map":
                    outs += list(run_map(ops, b, self.ctx))
                elif st.kind in ("route", "explode"):
                    outs += list(run_ports(ops[0], b, self.ctx))
                else:  # merge
                    outs.append(("out", run_merge(ops[0], b, self.ctx)))
            for port, out in outs:
                if port == DEAD:
                    answer.dead.append(out)
                elif out.num_rows:
                    ports.setdefault(f"{st.id}:{port}", []).append(out)
        return answer

    def _collect(self, op, ins, dead) -> list[tuple[str, pa.RecordBatch]]:
        c = Collector(op, self.ctx)
        out = []
        for d in dead:
            out += c.add_dead(d)
        for tag, b in sorted(ins, key=lambda x: -x[0]):  # parents (input 1) first
            out += c.add_parents(b) if tag == 1 else c.add_children(b)
        out += c.rest()
        return [("out", b) for b in out]


class InlineRunner(Executor):
    """Runs a plan whose sources list their inputs, in this thread, ``chunk_size`` inputs at a
    time; ``answers`` and ``dead`` keep what its memory sinks got and every dead letter."""

    name = "InlineRunner"
    formats = frozenset({"memory"})

    def __init__(self, chunk_size: int = 16):
        self.chunk_size = chunk_size
        self.answers: dict[str, list[pa.RecordBatch]] = {}
        self.dead: list[pa.RecordBatch] = []

    def execute(self, plan: Plan, ctx: RunContext) -> RunStats:
        self.check(plan)
        clock = Clock()
        ctx.started(plan)
        engine = Engine(plan, ctx)
        for st in plan.stages:
            if st.kind != "source":
                continue
            (op,) = engine.ops[st.id]
            refs = list(op.refs())
            for i in range(0, len(refs), self.chunk_size):
                ok, dead = run_source(op, refs[i:i + self.chunk_size], ctx)
                answer = engine.run(ok, st.id) if ok.num_rows else Answer()
                for step, rows in answer.rows.items():
                    self.answers.setdefault(step, []).extend(rows)
                self.dead += [d for d in (dead, *answer.dead) if d.num_rows]
        out = stats(plan, ctx, clock(), runner=self.name)
        ctx.ended(out)
        return out


__all__ = ["Answer", "Engine", "InlineRunner"]

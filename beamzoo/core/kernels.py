"""One kernel per primitive, shared by every executor, each reporting per-step metrics.

An executor moves batches between stages its own way (threads and channels,
Beam's transforms, one request at a time); what happens to a batch inside a
stage is the same everywhere and is here. Each kernel times every step it
runs (wall and thread CPU seconds) and records rows in, rows out, dead
letters and rows skipped into the run context (``RunContext.record``).
Outputs are ``(port, batch)`` pairs; dead letters come out as ``(DEAD, batch)``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import pyarrow as pa

from beamzoo.core.context import RunContext
from beamzoo.core.graph import DEAD
from beamzoo.core.metrics import Sample
from beamzoo.core.op import Operator


def _reasons(dead: pa.RecordBatch) -> list[str] | None:
    return dead.column("error").to_pylist() if dead.num_rows else None


def run_map(ops: list[Operator], batch: pa.RecordBatch, ctx: RunContext,
            wait_in: float = 0.0) -> Iterator[tuple[str, pa.RecordBatch]]:
    """A fused map stage's operators on ``batch``, in order; yields what comes out of the last
    (``"out"``) and every step's dead letters (``DEAD``). A step may hand on its output in
    pieces, each through the rest before the next is made."""
    if not ops or batch.num_rows == 0:
        if batch.num_rows:
            yield "out", batch
        return
    op, n = ops[0], batch.num_rows
    out = dead_n = 0
    reasons: list[str] = []
    wall = cpu = 0.0
    pieces = op.process_pieces(batch)
    t, c = time.perf_counter(), time.thread_time()
    for piece, dead in pieces:
        wall += time.perf_counter() - t
        cpu += time.thread_time() - c
        out += piece.num_rows
        dead_n += dead.num_rows
        if dead.num_rows:
            reasons += dead.column("error").to_pylist()
            yield DEAD, dead
        yield from run_map(ops[1:], piece, ctx)
        t, c = time.perf_counter(), time.thread_time()
    wall += time.perf_counter() - t
    cpu += time.thread_time() - c
    ctx.record(op.id, op.kind, Sample(n, out, dead_n, n - out - dead_n, 1, wall, cpu, wait_in,
                                      reasons=reasons or None))


def run_ports(op: Operator, batch: pa.RecordBatch, ctx: RunContext,
              wait_in: float = 0.0) -> Iterator[tuple[str, pa.RecordBatch]]:
    """A route or a one-to-many step on ``batch``: each port's rows, and the dead letters; a
    step may hand them on in pieces (``process_pieces``)."""
    if batch.num_rows == 0:
        return
    ports: dict[str, int] = defaultdict(int)
    dead_n, reasons, wall, cpu = 0, [], 0.0, 0.0
    pieces = op.process_pieces(batch)
    t, c = time.perf_counter(), time.thread_time()
    for outs, dead in pieces:
        wall += time.perf_counter() - t
        cpu += time.thread_time() - c
        dead_n += dead.num_rows
        if dead.num_rows:
            reasons += dead.column("error").to_pylist()
            yield DEAD, dead
        for port, b in outs.items():
            ports[port] += b.num_rows
            if b.num_rows:
                yield port, b
        t, c = time.perf_counter(), time.thread_time()
    wall += time.perf_counter() - t
    cpu += time.thread_time() - c
    n = batch.num_rows
    passed = ports.get("parents", 0) if op.kind == "explode" else sum(ports.values())
    ctx.record(op.id, op.kind, Sample(n, passed, dead_n, n - passed - dead_n, 1, wall, cpu, wait_in,
                                      ports=dict(ports), reasons=reasons or None))


def run_merge(op: Operator, batch: pa.RecordBatch, ctx: RunContext, wait_in: float = 0.0) -> pa.RecordBatch:
    """A merge's input batch laid out as the merged schema."""
    t, c = time.perf_counter(), time.thread_time()
    out = op.process(batch).ok
    ctx.record(op.id, op.kind, Sample(batch.num_rows, out.num_rows, 0, 0, 1, time.perf_counter() - t,
                                      time.thread_time() - c, wait_in))
    return out


def run_source(op: Operator, refs: list[str], ctx: RunContext) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """A source's records for ``refs`` (listed by ``op.refs()``), and the dead letters of those
    it could not make records of."""
    t, c = time.perf_counter(), time.thread_time()
    ok, dead = op.to_batch(refs)
    ctx.record(op.id, op.kind, Sample(len(refs), ok.num_rows, dead.num_rows, 0, 1, time.perf_counter() - t,
                                      time.thread_time() - c, reasons=_reasons(dead)))
    return ok, dead


def record_sink(ctx: RunContext, op: Operator, rows: int, wall: float, cpu: float, wait_in: float = 0.0) -> None:
    """A batch a sink wrote."""
    ctx.record(op.id, op.kind, Sample(rows, rows, 0, 0, 1, wall, cpu, wait_in))


def record_wait(ctx: RunContext, op: Operator, wait_out: float) -> None:
    """Seconds a step waited for room downstream."""
    if wait_out:
        ctx.record(op.id, op.kind, Sample(batches=0, wait_out_s=wait_out))


class Collector:
    """A collect's state: parents, and the children and dead children of each, until every
    child a parent had is accounted for; ``add`` returns the parents made complete."""

    def __init__(self, op: Operator, ctx: RunContext):
        self.op, self.ctx = op, ctx
        self.wanted = ["id", *op.params["fields"]]
        self.parents: dict[str, tuple[pa.RecordBatch, int]] = {}
        self.kids: dict[str, list[dict]] = defaultdict(list)
        self.died: dict[str, int] = defaultdict(int)

    def add_parents(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        pids = batch.column("id").to_pylist()
        for i, (p, n) in enumerate(zip(pids, batch.column("children").to_pylist())):
            self.parents[p] = (batch.slice(i, 1), n)
        return self._complete(pids)

    def add_children(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        pids = batch.column("parent_id").to_pylist()
        for p, row in zip(pids, batch.select(self.wanted).to_pylist()):
            self.kids[p].append(row)
        self.ctx.record(self.op.id, self.op.kind, Sample(0, 0, 0, 0, 0, ports={"children": batch.num_rows}))
        return self._complete(pids)

    def add_dead(self, dead: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Dead letters of children (those with a parent id) that will never arrive."""
        pids = [p for p in dead.column("parent_id").to_pylist() if p is not None]
        for p in pids:
            self.died[p] += 1
        return self._complete(pids)

    def _complete(self, pids) -> list[pa.RecordBatch]:
        done = [p for p in dict.fromkeys(pids) if p in self.parents
                and len(self.kids[p]) + self.died[p] >= self.parents[p][1]]
        return [self._emit(done)] if done else []

    def rest(self) -> list[pa.RecordBatch]:
        """Every parent still waiting (its other children went elsewhere: another branch)."""
        return [self._emit(list(self.parents))] if self.parents else []

    def _emit(self, pids) -> pa.RecordBatch:
        t, c = time.perf_counter(), time.thread_time()
        batch = pa.concat_batches([self.parents[p][0] for p in pids])
        out = self.op.assemble(batch, {p: self.kids[p] for p in pids})
        for p in pids:
            self.parents.pop(p), self.kids.pop(p, None), self.died.pop(p, None)
        self.ctx.record(self.op.id, self.op.kind, Sample(len(pids), out.num_rows, 0, 0, 1,
                                                         time.perf_counter() - t, time.thread_time() - c))
        return out


__all__ = ["Collector", "record_sink", "record_wait", "run_map", "run_merge", "run_ports", "run_source"]

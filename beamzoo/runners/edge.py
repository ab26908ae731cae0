"""The edge runner: a graph in one process, no Beam.

The planner's stages become threads joined by bounded channels, one channel
into each stage, so memory stays bounded for any DAG: a stage that cannot
hand on its output waits. Row-parallel stages (decode, inference with
one-thread sessions) run in ``workers`` threads, each with its own operators
(heavy state is shared per process); routes, merges, collects and sinks in
one thread each. Dead letters go to one unbounded hub (they are small, and a
bounded one could close a cycle of waits): it writes the dead-letter sinks
and tells each collect how many of its children died.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import pyarrow as pa

from beamzoo.gates import clear_stop, stop_reason
from beamzoo.graph import DEAD, Graph, split_ref
from beamzoo.plan import Plan, Stage, check_kinds, plan, run_fused
from beamzoo.resume import run_id
from beamzoo.runners.sinks import JsonlSink, ParquetSink


@dataclass
class RunStats:
    inputs: int = 0
    scored: int = 0
    failed: int = 0
    skipped: int = 0  # inputs already done (resume)
    seconds: float = 0.0
    first_result_s: float | None = None
    written: dict = field(default_factory=dict)  # sink id -> rows
    counters: dict = field(default_factory=dict)  # a step's own counts (a gate's rows held)
    stopped: str | None = None  # why a gate stopped the run early (what was read is written)

    def line(self) -> str:
        done = f"  already done: {self.skipped}" if self.skipped else ""
        return f"inputs: {self.inputs}  scored: {self.scored}  dead letters: {self.failed}{done}"


class Aborted(Exception):
    """Another thread failed; this one stops."""


class Channel:
    """A queue of (tag, batch) with ``producers`` writers, holding at most ``maxsize`` items
    and ``max_bytes`` bytes of batches (an item bigger than that enters an empty channel
    alone); ``get`` returns None once all writers closed and it is empty."""

    def __init__(self, maxsize: int, producers: int, max_bytes: int = 0):
        self.items, self.maxsize, self.open = deque(), maxsize, producers
        self.max_bytes, self.bytes = max_bytes, 0
        self.cv = threading.Condition()
        self.aborted = False

    def _full(self, size: int) -> bool:
        if self.maxsize and len(self.items) >= self.maxsize:
            return True
        return bool(self.max_bytes and self.items and self.bytes + size > self.max_bytes)

    def put(self, item) -> None:
        size = _nbytes(item)
        with self.cv:
            while self._full(size) and not self.aborted:
                self.cv.wait()
            if self.aborted:
                raise Aborted
            self.items.append((item, size))
            self.bytes += size
            self.cv.notify_all()

    def get(self):
        with self.cv:
            while not self.items and self.open > 0 and not self.aborted:
                self.cv.wait()
            if self.aborted:
                raise Aborted
            if not self.items:
                return None
            item, size = self.items.popleft()
            self.bytes -= size
            self.cv.notify_all()
            return item

    def close_one(self) -> None:
        with self.cv:
            self.open -= 1
            self.cv.notify_all()

    def abort(self) -> None:
        with self.cv:
            self.aborted = True
            self.cv.notify_all()


def _nbytes(item) -> int:
    batch = item[1] if isinstance(item, tuple) and len(item) == 2 else None
    return batch.nbytes if isinstance(batch, pa.RecordBatch) else 0


class EdgeRunner:
    """Runs a graph in this process.

    ``workers``: threads for each row-parallel stage (default: CPU count).
    ``chunk_size``: rows per task. ``queue_depth``: batches waiting on each edge, and
    ``queue_bytes`` the bytes they may hold (one bigger batch passes alone); with the
    file reader's ``batch_bytes``, what is in memory is bounded in bytes, not only rows.
    ``rows_per_file``/``seconds_per_file``: how often output files are committed
    (what a killed run keeps). ``progress``: a bar on a terminal (never in logs).
    """

    name = "EdgeRunner"

    def __init__(self, workers: int | None = None, chunk_size: int = 16, queue_depth: int | None = None,
                 progress: bool = True, rows_per_file: int = 10_000, seconds_per_file: float = 60.0,
                 queue_bytes: int = 256 << 20):
        for what, v in (("workers", workers), ("chunk_size", chunk_size), ("queue_depth", queue_depth),
                        ("queue_bytes", queue_bytes)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"EdgeRunner: {what} must be an integer >= 1, got {v!r}")
        self.workers = workers or os.cpu_count() or 1
        self.chunk_size = chunk_size
        self.queue_depth = queue_depth or 4 * self.workers
        self.progress, self.queue_bytes = progress, queue_bytes
        self.rows_per_file, self.seconds_per_file = rows_per_file, seconds_per_file

    def run(self, graph: Graph, run: str | None = None) -> RunStats:
        clear_stop()
        return _Run(self, plan(graph), run or run_id()).go()

PLAN_FUNCTIONS = {}  # primitive kind -> how one thread of its stage runs


def _plans(kind):
    def deco(fn):
        PLAN_FUNCTIONS[kind] = fn
        return fn
    return deco


class _Run:
    def __init__(self, runner: EdgeRunner, plan: Plan, run: str):
        check_kinds(plan, PLAN_FUNCTIONS, runner.name)
        self.r, self.plan, self.run_name = runner, plan, run
        self.stats, self.lock = RunStats(), threading.Lock()
        self.error: BaseException | None = None
        self.start = time.perf_counter()
        self.threads_of = {s.id: self._threads(s) for s in plan.stages}
        self.inbox = {s.id: Channel(runner.queue_depth, self._feeds(s), runner.queue_bytes) for s in plan.stages
                      if s.kind != "source"}
        self.dead = Channel(0, sum(self.threads_of[s.id] for s in plan.stages if s.kind != "sink"))
        self.left = {s.id: self.threads_of[s.id] for s in plan.stages}
        self.bar = _progress(runner.progress)

    def _threads(self, s: Stage) -> int:
        return self.r.workers if s.parallel and s.kind in ("map", "explode", "route") else 1

    def _feeds(self, s: Stage) -> int:
        """How many producer threads close the stage's inbox."""
        n = sum(self.threads_of[split_ref(r)[0]] for r in s.inputs if r != DEAD)
        if DEAD in s.inputs or s.kind == "collect":
            n += 1  # the dead-letter hub
        return n

    # ------------------------------------------------------------- plumbing
    def emit(self, stage: Stage, port: str, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        for consumer in self.plan.consumers(stage, port):
            tag = consumer.inputs.index(f"{stage.id}:{port}")
            self.inbox[consumer.id].put((tag, batch))

    def emit_dead(self, dead: pa.RecordBatch) -> None:
        if dead.num_rows:
            self.dead.put(("dead", dead))

    def close(self, stage: Stage) -> None:
        """One thread of ``stage`` ended; the last one closes what it feeds."""
        with self.lock:
            self.left[stage.id] -= 1
            last = self.left[stage.id] == 0
        if stage.kind != "sink":
            if last:
                self.dead.put(("closed", stage.id))
            self.dead.close_one()
        if not last:
            return
        for consumer in self.plan.stages:
            for ref in consumer.inputs:
                if ref != DEAD and split_ref(ref)[0] == stage.id:
                    for _ in range(self.threads_of[stage.id]):
                        self.inbox[consumer.id].close_one()

    def count(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def thread(self, stage: Stage) -> None:
        try:
            PLAN_FUNCTIONS[stage.kind](self, stage)
        except Aborted:
            return
        except BaseException as exc:  # noqa: BLE001 - stop every thread, re-raised by go()
            self.fail(exc)
            return
        self.close(stage)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        for ch in (*self.inbox.values(), self.dead):
            ch.abort()

    def go(self) -> RunStats:
        threads = [threading.Thread(target=self.thread, args=(s,), name=f"beamzoo-{s.id}", daemon=True)
                   for s in self.plan.stages for _ in range(self.threads_of[s.id])]
        threads.append(threading.Thread(target=self.hub_thread, name="beamzoo-dead", daemon=True))
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException as exc:  # Ctrl-C: stop the threads, then raise it
            self.fail(exc)
            for t in threads:
                t.join()
        finally:
            self.bar.close()
        if self.error is not None:
            raise self.error
        self.stats.stopped = stop_reason()  # set even when every input had been read by then
        self.stats.seconds = time.perf_counter() - self.start
        return self.stats

    def hub_thread(self) -> None:
        sinks = [s for s in self.plan.stages if DEAD in s.inputs and s.kind == "sink"]
        waiting = {s.id: _upstream(self.plan, s) for s in self.plan.stages if s.kind == "collect"}
        finished: set[str] = set()
        try:
            while (item := self.dead.get()) is not None:
                what, value = item
                if what == "closed":
                    finished.add(value)
                    for cid in [c for c, ups in waiting.items() if ups <= finished]:
                        del waiting[cid]  # nothing more can die upstream of it
                        self.inbox[cid].close_one()
                    continue
                self.count(failed=value.num_rows)
                self.bar.update(value.num_rows)
                for s in sinks:
                    self.inbox[s.id].put((0, value))
                if waiting and value.column("parent_id").null_count < value.num_rows:
                    for cid in waiting:
                        self.inbox[cid].put(("dead", value))
        except Aborted:
            return
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc)
            return
        for s in sinks:
            self.inbox[s.id].close_one()


def _upstream(plan: Plan, stage: Stage) -> set[str]:
    """The ids of every stage with a path to ``stage``."""
    seen: set[str] = set()
    todo = [split_ref(r)[0] for r in stage.inputs if r != DEAD]
    while todo:
        sid = todo.pop()
        if sid not in seen:
            seen.add(sid)
            todo += [split_ref(r)[0] for r in next(s for s in plan.stages if s.id == sid).inputs if r != DEAD]
    return seen


def _progress(enabled: bool):
    from tqdm import tqdm
    on = enabled and sys.stderr.isatty()
    return tqdm(unit="row", disable=not on, smoothing=0.1, mininterval=0.5)


@_plans("source")
def _source(run: _Run, stage: Stage) -> None:
    (op,) = stage.operators()
    chunk = []

    def flush():
        ok, dead = op.to_batch(chunk)
        run.count(inputs=len(chunk))
        with run.lock:
            run.bar.total = (run.bar.total or 0) + len(chunk)
        run.emit_dead(dead)
        run.emit(stage, "out", ok)
        chunk.clear()

    for ref in op.refs():
        chunk.append(ref)
        if len(chunk) >= run.r.chunk_size:
            flush()
            if stop_reason():  # a gate stopped the run: read no more, finish what was read
                return
    if chunk:
        flush()


def _steps(ops, batch: pa.RecordBatch, run: _Run):
    """Fused maps in order (``run_fused``): dead letters to the hub, rows a step drops
    (resume) counted."""
    def piece(op, rows, dead):
        run.emit_dead(dead)
        _add_counters(run, op)
        return ()

    def skipped(n):
        run.count(skipped=n)
        run.bar.update(n)
    return run_fused(ops, batch, piece, skipped)


def _add_counters(run: _Run, op) -> None:
    """A step's own counts since it last reported (a gate's rows held, a remote step's
    rows per endpoint) into the run's stats."""
    if hasattr(op, "counters"):
        with run.lock:
            for k, v in op.counters().items():
                run.stats.counters[k] = run.stats.counters.get(k, 0) + v


@_plans("map")
def _map(run: _Run, stage: Stage) -> None:
    ops = stage.operators()
    for op in ops:
        op.setup()
    inbox = run.inbox[stage.id]
    while (item := inbox.get()) is not None:
        for out in _steps(ops, item[1], run):
            run.emit(stage, "out", out)


@_plans("route")
@_plans("explode")
def _ports(run: _Run, stage: Stage) -> None:
    (op,) = stage.operators()
    op.setup()
    inbox = run.inbox[stage.id]
    while (item := inbox.get()) is not None:
        outs, dead = op.process(item[1])
        run.emit_dead(dead)
        _add_counters(run, op)
        for port, batch in outs.items():
            run.emit(stage, port, batch)


@_plans("merge")
def _merge(run: _Run, stage: Stage) -> None:
    (op,) = stage.operators()
    op.output_schemas([run.plan.graph.schema(r) for r in stage.steps[0].inputs])
    inbox = run.inbox[stage.id]
    while (item := inbox.get()) is not None:
        run.emit(stage, "out", op.process(item[1]).ok)


@_plans("collect")
def _collect(run: _Run, stage: Stage) -> None:
    (op,) = stage.operators()
    op.output_schemas([run.plan.graph.schema(r) for r in stage.steps[0].inputs])
    wanted = ["id", *op.params["fields"]]
    parents: dict[str, tuple[pa.RecordBatch, int]] = {}
    kids: dict[str, list[dict]] = defaultdict(list)
    died: dict[str, int] = defaultdict(int)
    inbox = run.inbox[stage.id]

    def complete(pids) -> None:
        done = [p for p in pids if p in parents and len(kids[p]) + died[p] >= parents[p][1]]
        if done:
            emit(done)

    def emit(pids) -> None:
        batch = pa.concat_batches([parents[p][0] for p in pids])
        run.emit(stage, "out", op.assemble(batch, {p: kids[p] for p in pids}))
        for p in pids:
            parents.pop(p), kids.pop(p, None), died.pop(p, None)

    while (item := inbox.get()) is not None:
        tag, batch = item
        if tag == "dead":
            pids = [p for p in batch.column("parent_id").to_pylist() if p is not None]
            for p in pids:
                died[p] += 1
        elif tag == 1:  # parents
            pids = batch.column("id").to_pylist()
            counts = batch.column("children").to_pylist()
            for i, (p, n) in enumerate(zip(pids, counts)):
                parents[p] = (batch.slice(i, 1), n)
        else:  # children
            pids = batch.column("parent_id").to_pylist()
            for p, row in zip(pids, batch.select(wanted).to_pylist()):
                kids[p].append(row)
        complete(set(pids))
    if parents:  # children that went elsewhere (another branch) are not waited for
        emit(list(parents))


@_plans("sink")
def _sink(run: _Run, stage: Stage) -> None:
    (op,) = stage.operators()
    ref = stage.steps[0].inputs[0]
    schema = op.file_schema(run.plan.graph.schema(ref))
    kw = dict(rows_per_file=run.r.rows_per_file, seconds_per_file=run.r.seconds_per_file)
    path = op.params["path"]
    sink = ParquetSink(path, schema, run.run_name, **kw) if op.op_name == "parquet" else \
        JsonlSink(path, schema, run.run_name, **kw)
    is_dead = ref == DEAD
    inbox = run.inbox[stage.id]
    with sink:
        while (item := inbox.get()) is not None:
            batch = item[1]
            sink.write(batch.select(schema.names))
            if not is_dead:
                with run.lock:
                    run.stats.scored += batch.num_rows
                    run.stats.written[stage.id] = run.stats.written.get(stage.id, 0) + batch.num_rows
                    if run.stats.first_result_s is None:
                        run.stats.first_result_s = time.perf_counter() - run.start
                run.bar.update(batch.num_rows)
        if run.error is not None:
            raise Aborted

"""The edge runner: a graph in one process, no Beam.

The plan's stages become threads joined by bounded channels, one channel
into each stage, so memory stays bounded for any DAG: a stage that cannot
hand on its output waits. Row-parallel stages (decode, inference with
one-thread sessions) run in ``workers`` threads, each with its own operators
(heavy state is shared per process); routes, merges, collects and sinks in
one thread each. Dead letters go to one unbounded hub (they are small, and a
bounded one could close a cycle of waits): it writes the dead-letter sinks
and tells each collect how many of its children died. What happens to a
batch inside a stage is the shared kernels' (``beamzoo.core.kernels``), which
report every step's metrics; the time a stage waits on its channels is
reported too.

With ``adapt`` an ``Adapter`` (``beamzoo.core.adapt``) keeps each step within its
latency budget while the run goes on: it moves a step's own batch size (an
operator reads its ``batch_size`` knob per call, from ``params`` or the attribute
of that name) and the rows per task (``chunk_size``, read by the sources per
task). The worker threads stay as started: a stage's thread count closes its
channels and the dead-letter hub, so it cannot change part-way.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque

import pyarrow as pa

from beamzoo.core.adapt import Adapter, Lever, check_budgets
from beamzoo.core.context import Hooks, RunContext
from beamzoo.core.executor import Clock, Executor, kernel_table, stats
from beamzoo.core.graph import DEAD, split_ref
from beamzoo.core.kernels import Collector, record_sink, record_wait, run_map, run_merge, run_ports, run_source
from beamzoo.core.knobs import Knob, bind, declare
from beamzoo.core.compile import Plan, Stage
from beamzoo.core.metrics import RunStats
from beamzoo.core.registry import op_class
from beamzoo.runners.sinks import WRITERS


class Aborted(Exception):
    """Another thread failed; this one stops."""


class Channel:
    """A queue of (tag, batch) with ``producers`` writers, holding at most ``maxsize`` items
    and ``max_bytes`` bytes of batches (an item bigger than that enters an empty channel
    alone); ``get`` returns None once all writers closed and it is empty. ``waited``: the
    seconds the last ``put`` or ``get`` waited."""

    def __init__(self, maxsize: int, producers: int, max_bytes: int = 0):
        self.items, self.maxsize, self.open = deque(), maxsize, producers
        self.max_bytes, self.bytes = max_bytes, 0
        self.cv = threading.Condition()
        self.aborted = False

    def _full(self, size: int) -> bool:
        if self.maxsize and len(self.items) >= self.maxsize:
            return True
        return bool(self.max_bytes and self.items and self.bytes + size > self.max_bytes)

    def put(self, item) -> float:
        """Queue ``item``; the seconds it waited for room."""
        size = _nbytes(item)
        waited = 0.0
        with self.cv:
            if self._full(size) and not self.aborted:
                t = time.perf_counter()
                while self._full(size) and not self.aborted:
                    self.cv.wait()
                waited = time.perf_counter() - t
            if self.aborted:
                raise Aborted
            self.items.append((item, size))
            self.bytes += size
            self.cv.notify_all()
        return waited

    def get(self):
        """The next item (None once closed and empty), and the seconds it waited for it."""
        waited = 0.0
        with self.cv:
            if not self.items and self.open > 0 and not self.aborted:
                t = time.perf_counter()
                while not self.items and self.open > 0 and not self.aborted:
                    self.cv.wait()
                waited = time.perf_counter() - t
            if self.aborted:
                raise Aborted
            if not self.items:
                return None, waited
            item, size = self.items.popleft()
            self.bytes -= size
            self.cv.notify_all()
            return item, waited

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


class EdgeRunner(Executor):
    """Runs a graph in this process, no Beam needed.

    ``workers``: threads for each row-parallel stage (default: the CPU count).
    ``chunk_size``: rows per task. ``queue_depth``: batches waiting on each edge, and
    ``queue_bytes`` the bytes they may hold (one bigger batch passes alone); with the
    file reader's ``batch_bytes``, what is in memory is bounded in bytes, not only rows.
    ``rows_per_file``/``seconds_per_file``: how often output files are committed
    (what a killed run keeps). ``progress``: a bar on a terminal (never in logs).
    ``adapt``: keep each step within ``budgets`` ({step id: seconds per row}; without them,
    1.5 x its first batches) by moving batch sizes and ``chunk_size`` while running.
    """

    name = "EdgeRunner"
    formats = frozenset(WRITERS)
    knobs = {"workers": Knob(None, int, low=1, high=4096, results=False, tune="cores",
                             doc="edge runner: threads for each row-parallel stage (default: the CPU count)"),
             "chunk_size": Knob(16, int, low=1, high=1 << 20, results=False, doc="rows per task"),
             "queue_depth": Knob(None, int, low=1, results=False,
                                 doc="batches waiting on each edge (default: 4 x workers)"),
             "queue_bytes": Knob(256 << 20, int, low=1, results=False, unit="bytes",
                                 doc="bytes of batches waiting on each edge"),
             "rows_per_file": Knob(10_000, int, low=1, results=False, doc="rows per committed output file"),
             "seconds_per_file": Knob(60.0, float, low=0.0, results=False, unit="seconds",
                                      doc="an output file is committed at least this often"),
             "progress": Knob(True, bool, results=False, doc="a progress bar on a terminal"),
             "adapt": Knob(False, bool, results=False,
                           doc="keep each step within its latency budget while running (a --config's budgets): "
                               "batch sizes move within bounds, each change logged and in the run's stats"),
             "budgets": Knob(None, dict, results=False,
                             doc="{step id: latency budget, seconds per row} that --adapt keeps to")}
    positional = ()

    def __init__(self, **knobs):
        p = bind(type(self).__name__, self.knobs, (), (), knobs)
        self.params = p
        self.workers = p["workers"] or os.cpu_count() or 1
        self.chunk_size = p["chunk_size"]
        self.queue_depth = p["queue_depth"] or 4 * self.workers
        self.progress, self.queue_bytes = p["progress"], p["queue_bytes"]
        self.rows_per_file, self.seconds_per_file = p["rows_per_file"], p["seconds_per_file"]
        self.adapt, self.budgets = p["adapt"], check_budgets(type(self).__name__, p["budgets"])

    def execute(self, plan: Plan, ctx: RunContext) -> RunStats:
        self.check(plan)
        return _Run(self, plan, ctx).go()


declare(EdgeRunner, extra=())
KERNELS = {}  # primitive kind -> how one thread of its stage runs
_kernel = kernel_table(KERNELS)


class _Bar(Hooks):
    """The progress bar: inputs answered (written, dead-lettered or skipped) of those listed.

    Until every source has finished listing it says ``listing`` and shows no total (so no
    ETA); a thread per source counts its listing ahead of the run (``count``), and a source
    that finishes its own listing first gives the exact total (``listed``). ``file``: where
    it writes (default stderr, and only on a terminal)."""

    def __init__(self, enabled: bool, dead_sinks: set[str], sources: tuple[str, ...] = (), file=None):
        from tqdm import tqdm
        shown = enabled and (file is not None or sys.stderr.isatty())
        self.bar = tqdm(unit="row", disable=not shown, smoothing=0.1, mininterval=0.5, file=file, desc="listing")
        self.dead_sinks = dead_sinks
        self.lock = threading.Lock()
        self.listing = dict.fromkeys(sources)  # source id -> its count once known
        self.exact: set[str] = set()  # sources whose own listing ended
        self.stopped = threading.Event()

    @property
    def shown(self) -> bool:
        return not self.bar.disable

    def count(self, step: str, refs) -> threading.Thread:
        """Count what ``refs()`` lists (a source's references) in a thread of its own."""
        def go():
            n = 0
            try:
                for _ in refs():
                    if self.stopped.is_set():
                        return
                    n += 1
            except Exception:  # noqa: BLE001 - the source's own listing reports the error
                return
            self.listed(step, n, exact=False)
        t = threading.Thread(target=go, name=f"beamzoo-count-{step}", daemon=True)
        t.start()
        return t

    def listed(self, step: str, n: int, exact: bool = True) -> None:
        """Source ``step`` lists ``n`` references; once every source is known the bar gets its
        total and its ETA (a count from the source's own listing wins)."""
        with self.lock:
            if step in self.exact:
                return
            if exact:
                self.exact.add(step)
            self.listing[step] = n
            if all(v is not None for v in self.listing.values()):
                self.bar.total = sum(self.listing.values())
                self.bar.set_description_str("", refresh=False)
                self.bar.refresh()

    def batch_done(self, ctx, step, kind, sample):
        done = sample.dead + sample.skipped + (sample.rows_in if kind == "sink" and step not in self.dead_sinks
                                               else 0)
        if done:
            with self.lock:
                self.bar.update(done)

    def close(self) -> None:
        self.stopped.set()
        self.bar.close()


class _Run:
    def __init__(self, runner: EdgeRunner, plan: Plan, ctx: RunContext):
        self.r, self.plan, self.ctx = runner, plan, ctx
        self.error: BaseException | None = None
        self.interrupted = False  # Ctrl-C or SIGTERM: the sinks commit what they have written
        self.clock = Clock()
        self.first: float | None = None
        self.lock = threading.Lock()
        self.threads_of = {s.id: self._threads(s) for s in plan.stages}
        self.inbox = {s.id: Channel(runner.queue_depth, self._feeds(s), runner.queue_bytes) for s in plan.stages
                      if s.kind != "source"}
        self.dead = Channel(0, sum(self.threads_of[s.id] for s in plan.stages if s.kind != "sink"))
        self.left = {s.id: self.threads_of[s.id] for s in plan.stages}
        dead_sinks = {st.id for s in plan.stages if s.kind == "sink" and DEAD in s.inputs for st in s.steps}
        sources = tuple(s.id for s in plan.stages if s.kind == "source")
        self.bar = _Bar(runner.progress, dead_sinks, sources)
        self.consumers = {(s.id, port): [(c, c.inputs.index(f"{s.id}:{port}")) for c in plan.stages
                                         if f"{s.id}:{port}" in c.inputs]
                          for s in plan.stages for port in _ports_of(s)}
        self.chunk_size = runner.chunk_size  # the rows per task; --adapt may move it
        self.live: dict[str, list] = {}  # step id -> its operators, one per thread
        self.tuned: dict[tuple[str, str], object] = {}  # (step id, knob) -> the value --adapt moved it to
        self.adapter = Adapter(self._levers(), runner.budgets, say=_say) if runner.adapt else None

    def _levers(self) -> list[Lever]:
        """What --adapt may move: each step's own batch size, then the rows per task."""
        levers = []
        for s in self.plan.stages:
            for st in s.steps if s.kind in ("map", "explode", "route") else ():
                knob = op_class(st.op).knobs.get("batch_size")
                if knob is not None and not knob.results:
                    levers.append(Lever("batch_size", knob, st.params.get("batch_size", knob.default),
                                        lambda v, sid=st.id: self.retune(sid, "batch_size", v), steps=(st.id,)))
        levers.append(Lever("chunk_size", EdgeRunner.knobs["chunk_size"], self.chunk_size, self._chunk))
        return levers

    def _chunk(self, rows: int) -> None:
        self.chunk_size = rows

    def retune(self, step: str, name: str, value) -> None:
        """Set speed knob ``name`` of every operator of ``step`` (and of those bound later)."""
        with self.lock:
            self.tuned[(step, name)] = value
            ops = list(self.live.get(step, ()))
        for op in ops:
            _set_knob(op, name, value)

    def bound(self, ops: list) -> None:
        """A thread's operators, bound: known to ``retune``, with what it moved so far."""
        with self.lock:
            for op in ops:
                self.live.setdefault(op.id, []).append(op)
                for (step, name), value in self.tuned.items():
                    if step == op.id:
                        _set_knob(op, name, value)

    def _threads(self, s: Stage) -> int:
        return self.r.workers if s.parallel and s.kind in ("map", "explode", "route") else 1

    def _feeds(self, s: Stage) -> int:
        """How many producer threads close the stage's inbox."""
        n = sum(self.threads_of[split_ref(r)[0]] for r in s.inputs if r != DEAD)
        if DEAD in s.inputs or s.kind == "collect":
            n += 1  # the dead-letter hub
        return n

    # ------------------------------------------------------------- plumbing
    def emit(self, stage: Stage, port: str, batch: pa.RecordBatch) -> float:
        """Hand ``batch`` to the stages reading ``port``; the seconds it waited for room."""
        if port == DEAD:
            if batch.num_rows:
                self.dead.put(("dead", batch))
            return 0.0
        waited = 0.0
        if batch.num_rows:
            for consumer, tag in self.consumers.get((stage.id, port), ()):
                waited += self.inbox[consumer.id].put((tag, batch))
        return waited

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

    def thread(self, stage: Stage) -> None:
        try:
            KERNELS[stage.kind](self, stage)
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
        self.ctx.hooks.append(self.bar)
        if self.adapter is not None:
            self.ctx.hooks.append(self.adapter)
        self.ctx.started(self.plan)
        if self.bar.shown:  # count the listing ahead, so the bar knows its total early
            for s in self.plan.stages:
                if s.kind == "source":
                    self.bar.count(s.id, lambda s=s: s.steps[0].operator().refs())
        threads = [threading.Thread(target=self.thread, args=(s,), name=f"beamzoo-{s.id}", daemon=True)
                   for s in self.plan.stages for _ in range(self.threads_of[s.id])]
        threads.append(threading.Thread(target=self.hub_thread, name="beamzoo-dead", daemon=True))
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException as exc:  # Ctrl-C, SIGTERM: stop the threads, commit what was written, raise it
            self.interrupted = isinstance(exc, KeyboardInterrupt)
            self.fail(exc)
            for t in threads:
                t.join()
        finally:
            self.bar.close()
            self.ctx.hooks.remove(self.bar)
            if self.adapter is not None:
                self.ctx.hooks.remove(self.adapter)
        if self.error is not None:
            raise self.error
        out = stats(self.plan, self.ctx, self.clock(), self.first, self.r.name)
        self.ctx.ended(out)
        return out

    def hub_thread(self) -> None:
        sinks = [s for s in self.plan.stages if DEAD in s.inputs and s.kind == "sink"]
        waiting = {s.id: _upstream(self.plan, s) for s in self.plan.stages if s.kind == "collect"}
        finished: set[str] = set()
        try:
            while (item := self.dead.get()[0]) is not None:
                what, value = item
                if what == "closed":
                    finished.add(value)
                    for cid in [c for c, ups in waiting.items() if ups <= finished]:
                        del waiting[cid]  # nothing more can die upstream of it
                        self.inbox[cid].close_one()
                    continue
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

    def written(self) -> None:
        if self.first is None:
            with self.lock:
                if self.first is None:
                    self.first = self.clock()


def _ports_of(stage: Stage) -> tuple[str, ...]:
    if stage.kind == "sink":
        return ()
    if stage.kind in ("route", "explode"):
        return tuple(stage.steps[0].operator().ports)
    return ("out",)


def _upstream(plan: Plan, stage: Stage) -> set[str]:
    """The ids of every stage with a path to ``stage``."""
    seen: set[str] = set()
    by_id = {s.id: s for s in plan.stages}
    todo = [split_ref(r)[0] for r in stage.inputs if r != DEAD]
    while todo:
        sid = todo.pop()
        if sid not in seen:
            seen.add(sid)
            todo += [split_ref(r)[0] for r in by_id[sid].inputs if r != DEAD]
    return seen


def _bound(run: _Run, stage: Stage):
    ops = stage.operators()
    for op in ops:
        op.bind(run.ctx)
    run.bound(ops)
    return ops


def _set_knob(op, name: str, value) -> None:
    """A speed knob of a running operator: in its parameters and in the attribute it reads per call."""
    op.params[name] = value
    if name in vars(op):
        setattr(op, name, value)


def _say(line: str) -> None:
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)  # above the progress bar, where one is shown


@_kernel("source")
def _source(run: _Run, stage: Stage) -> None:
    (op,) = _bound(run, stage)
    chunk: list[str] = []
    listed = 0

    def flush():
        ok, dead = run_source(op, chunk, run.ctx)
        run.emit(stage, DEAD, dead)
        record_wait(run.ctx, op, run.emit(stage, "out", ok))
        chunk.clear()

    for ref in op.refs():
        chunk.append(ref)
        listed += 1
        if len(chunk) >= run.chunk_size:
            flush()
            if run.ctx.stop_reason:  # the run is stopping: read no more, finish what was read
                return
    run.bar.listed(stage.id, listed)
    if chunk:
        flush()


@_kernel("map")
def _map(run: _Run, stage: Stage) -> None:
    ops = _bound(run, stage)
    inbox, last = run.inbox[stage.id], ops[-1]
    while (got := inbox.get())[0] is not None:
        (_, batch), waited = got
        for port, out in run_map(ops, batch, run.ctx, waited):
            waited_out = run.emit(stage, port, out)
            if port != DEAD:
                record_wait(run.ctx, last, waited_out)


@_kernel("route", "explode")
def _ports(run: _Run, stage: Stage) -> None:
    (op,) = _bound(run, stage)
    inbox = run.inbox[stage.id]
    while (got := inbox.get())[0] is not None:
        (_, batch), waited = got
        for port, out in run_ports(op, batch, run.ctx, waited):
            record_wait(run.ctx, op, run.emit(stage, port, out))


@_kernel("merge")
def _merge(run: _Run, stage: Stage) -> None:
    (op,) = _bound(run, stage)
    op.output_schemas([run.plan.graph.schema(r) for r in stage.steps[0].inputs])
    inbox = run.inbox[stage.id]
    while (got := inbox.get())[0] is not None:
        (_, batch), waited = got
        record_wait(run.ctx, op, run.emit(stage, "out", run_merge(op, batch, run.ctx, waited)))


@_kernel("collect")
def _collect(run: _Run, stage: Stage) -> None:
    (op,) = _bound(run, stage)
    op.output_schemas([run.plan.graph.schema(r) for r in stage.steps[0].inputs])
    collector = Collector(op, run.ctx)
    inbox = run.inbox[stage.id]
    add = {0: collector.add_children, 1: collector.add_parents, "dead": collector.add_dead}
    while (got := inbox.get())[0] is not None:
        tag, batch = got[0]
        for out in add[tag](batch):
            record_wait(run.ctx, op, run.emit(stage, "out", out))
    for out in collector.rest():  # children that went elsewhere (another branch) are not waited for
        run.emit(stage, "out", out)


@_kernel("sink")
def _sink(run: _Run, stage: Stage) -> None:
    (op,) = _bound(run, stage)
    ref = stage.steps[0].inputs[0]
    schema = op.file_schema(run.plan.graph.schema(ref))
    writer = WRITERS[op.format](op.path, schema, run.ctx.run_id, rows_per_file=run.r.rows_per_file,
                                seconds_per_file=run.r.seconds_per_file)
    answers = ref != DEAD
    inbox = run.inbox[stage.id]
    with writer:
        try:
            while (got := inbox.get())[0] is not None:
                (_, batch), waited = got
                t, c = time.perf_counter(), time.thread_time()
                writer.write(batch.select(schema.names))
                record_sink(run.ctx, op, batch.num_rows, time.perf_counter() - t, time.thread_time() - c, waited)
                if answers:
                    run.written()
        except Aborted:
            if not run.interrupted:
                raise
            return  # interrupted: every batch written is whole; the writer commits them (a resume skips them)
        if run.error is not None and not run.interrupted:
            raise Aborted


__all__ = ["Channel", "EdgeRunner", "KERNELS"]

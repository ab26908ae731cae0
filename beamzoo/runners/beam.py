"""Graphs on Beam: the plan as Beam transforms, and running it.

Each stage becomes one Beam transform: a fused map is one ``ParDo`` with the
dead letters as a tagged output, a route a ``ParDo`` with a tagged output per
branch, a merge a ``Flatten``, a collect a ``CoGroupByKey`` of parents and
children, a sink Beam's own file IO for the sink's format. Elements between
stages are Arrow record batches, and inside a stage the shared kernels do the
work (``beamzoo.core.kernels``). Operators are made once per DoFn instance and
their heavy state once per worker process (``beamzoo.core.resources``), so a
model is loaded once and shared by the threads.

Every step's metrics are Beam metrics (namespace ``beamzoo``): counters
``<step>|rows_in``, ``|rows_out``, ``|dead``, ``|skipped``, ``|batches``,
``|port|<port>`` and ``|reason|<reason>``, distributions ``<step>|wall_us`` and
``|cpu_us`` (one value a batch); a step's own counts are counters of their own
names. After the run they are read back into the run's ``RunStats.steps``.
Waits are Beam's own (it pushes elements through fused stages) and are not
observed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from beamzoo.core.compile import Plan, Stage
from beamzoo.core.context import RunContext
from beamzoo.core.executor import Clock, Executor, kernel_table, stats
from beamzoo.core.graph import DEAD, Graph, Step
from beamzoo.core.kernels import record_sink, run_map, run_merge, run_ports, run_source
from beamzoo.core.metrics import RunStats, Sample, StepMetrics, reason_key
from beamzoo.core.op import PRIMITIVES
from beamzoo.core.schemas import DEAD_LETTER_SCHEMA
from beamzoo.runners.options import beam_options

DEAD_TAG = "dead_letter"
NS = "beamzoo"
KERNELS = {}  # primitive kind -> how its stage becomes Beam transforms
_kernel = kernel_table(KERNELS)


class Progress:
    """Rows that reached a sink in this process (DirectRunner, and FlinkRunner's LOOPBACK
    workers, run here): what the progress bar of a Beam run shows."""

    rows = 0
    lock = threading.Lock()

    @classmethod
    def add(cls, n: int) -> None:
        with cls.lock:
            cls.rows += n


class WorkerContext(RunContext):
    """The run context inside a Beam worker: what a step records becomes Beam metrics."""

    def __init__(self, run: str, clock):
        super().__init__(run, clock)
        self._metrics: dict = {}
        self._unsent: list[tuple[str, str, object]] = []

    def _counter(self, name: str):
        c = self._metrics.get(name)
        if c is None:
            c = self._metrics[name] = Metrics.counter(NS, name)
        return c

    def _dist(self, name: str):
        d = self._metrics.get(name)
        if d is None:
            d = self._metrics[name] = Metrics.distribution(NS, name)
        return d

    def record(self, step, kind, s: Sample):
        while self._unsent:  # Beam keeps metrics of a bundle only: notes made in setup go with the first
            n_step, key, value = self._unsent.pop()
            Metrics.string_set(NS, f"{n_step}|note|{key}").add(json.dumps(value))
        for field in ("rows_in", "rows_out", "dead", "skipped", "batches"):
            n = getattr(s, field)
            if n:
                self._counter(f"{step}|{field}").inc(n)
        if s.batches:
            self._dist(f"{step}|wall_us").update(int(s.wall_s * 1e6))
            self._dist(f"{step}|cpu_us").update(int(s.cpu_s * 1e6))
        for port, n in (s.ports or {}).items():
            if n:
                self._counter(f"{step}|port|{port}").inc(n)
        if s.reasons:
            for r in s.reasons:
                self._counter(f"{step}|reason|{reason_key(r)}").inc()

    def count(self, name, n=1):
        if n:
            self._counter(name).inc(n)

    def note(self, step, key, value):
        self._unsent.append((step, key, value))


def flatten(pcolls: list, label: str):
    """The union of ``pcolls``; one PCollection is itself."""
    return pcolls[0] if len(pcolls) == 1 else tuple(pcolls) | label >> beam.Flatten()


def _steps_json(stage: Stage) -> str:
    return json.dumps([s.to_dict() for s in stage.steps])


class _StageFn(beam.DoFn):
    """Operators of a stage, bound in each worker to a context whose records are Beam metrics."""

    def __init__(self, stage: Stage, run: str, clock):
        self.steps_json, self.run, self.clock = _steps_json(stage), run, clock

    def setup(self):
        self.ctx = WorkerContext(self.run, self.clock)
        self.ops = [Step.from_dict(d).operator().bind(self.ctx) for d in json.loads(self.steps_json)]


class _MapFn(_StageFn):
    """Fused maps: rows out, dead letters tagged."""

    def process(self, batch):
        for port, out in run_map(self.ops, batch, self.ctx):
            yield beam.pvalue.TaggedOutput(DEAD_TAG, out) if port == DEAD else out


class _PortsFn(_StageFn):
    """A route or a one-to-many step: a tagged output per port."""

    def process(self, batch):
        for port, out in run_ports(self.ops[0], batch, self.ctx):
            yield beam.pvalue.TaggedOutput(DEAD_TAG if port == DEAD else port, out)


class _InputsFn(_StageFn):
    """A step that lays its rows out from the schemas of its inputs (a merge, a collect)."""

    def __init__(self, stage: Stage, run: str, clock, schemas: list[pa.Schema]):
        super().__init__(stage, run, clock)
        self.schemas = schemas

    def setup(self):
        super().setup()
        self.ops[0].output_schemas(self.schemas)


class _MergeFn(_InputsFn):
    def process(self, batch):
        yield run_merge(self.ops[0], batch, self.ctx)


class _SourceFn(_StageFn):
    def process(self, refs):
        ok, dead = run_source(self.op, [r.decode("utf-8", "surrogateescape") for r in refs], self.ctx)
        if dead.num_rows:
            yield beam.pvalue.TaggedOutput(DEAD_TAG, dead)
        if ok.num_rows:
            yield ok

    def setup(self):
        self.ctx = WorkerContext(self.run, self.clock)
        (d,) = json.loads(self.steps_json)
        # one source operator per worker process (a manifest is read once)
        self.op = self.ctx.shared(("source", d["op"], json.dumps(d["params"], sort_keys=True)),
                                  lambda: Step.from_dict(d).operator())


class _SinkFn(_StageFn):
    """A sink's batches counted (and timed) on their way to Beam's file IO."""

    def __init__(self, stage: Stage, run: str, clock, names: list[str], answers: bool):
        super().__init__(stage, run, clock)
        self.names, self.answers = names, answers

    def setup(self):
        super().setup()
        self.first = Metrics.distribution(NS, "first_output_ms") if self.answers else None

    def process(self, batch):
        t, c = time.perf_counter(), time.thread_time()
        out = batch.select(self.names)
        record_sink(self.ctx, self.ops[0], batch.num_rows, time.perf_counter() - t, time.thread_time() - c)
        Progress.add(batch.num_rows)
        if self.first is not None:
            self.first.update(int(time.time() * 1000))
        yield out


class Translation:
    """Applies a plan's stages to a Beam pipeline; ``inputs`` feeds the external sources
    (``Source.external``: a user's PCollection)."""

    def __init__(self, plan: Plan, root, run: str = "run", inputs: dict | None = None, chunk: int = 16,
                 clock=time.time):
        self.plan, self.root, self.run, self.chunk, self.clock = plan, root, run, chunk, clock
        self.inputs = inputs or {}
        self.ports: dict[str, beam.PCollection] = {}
        self.dead: list[beam.PCollection] = []

    def ref(self, stage_ref: str):
        return self.dead_letters() if stage_ref == DEAD else self.ports[stage_ref]

    def dead_letters(self):
        if DEAD not in self.ports:
            self.ports[DEAD] = flatten(self.dead, "DeadLetters") if self.dead else (
                self.root | "NoDeadLetters" >> beam.Create([]))
        return self.ports[DEAD]

    def apply(self) -> Translation:
        for stage in self.plan.stages:
            if DEAD not in stage.inputs:
                KERNELS[stage.kind](self, stage)
        for stage in self.plan.stages:
            if DEAD in stage.inputs:
                KERNELS[stage.kind](self, stage)
        return self


@_kernel("source")
def _source(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    if op.external:
        t.ports[f"{stage.id}:out"] = t.inputs[stage.id]
        return
    s = stage.steps[0]
    step = s.to_dict()

    def refs(_, step):
        for r in Step.from_dict(step).operator().refs():
            yield r.encode("utf-8", "surrogateescape")  # a file name need not be valid UTF-8

    out = (t.root
           | f"{s.id}/Start" >> beam.Create([None])
           | f"{s.id}/List" >> beam.FlatMap(refs, step)
           | f"{s.id}/Spread" >> beam.Reshuffle()
           | f"{s.id}/Batch" >> beam.BatchElements(min_batch_size=t.chunk, max_batch_size=t.chunk)
           | f"{s.id}/ToArrow" >> beam.ParDo(_SourceFn(stage, t.run, t.clock)).with_outputs(DEAD_TAG, main="out"))
    t.ports[f"{stage.id}:out"] = out.out
    t.dead.append(out[DEAD_TAG])


@_kernel("map")
def _map(t: Translation, stage: Stage) -> None:
    label = "+".join(s.id for s in stage.steps)  # Flink names its vertices after it
    out = t.ref(stage.inputs[0]) | label >> beam.ParDo(_MapFn(stage, t.run, t.clock)).with_outputs(
        DEAD_TAG, main="out")
    t.ports[f"{stage.id}:out"] = out.out
    t.dead.append(out[DEAD_TAG])


@_kernel("route", "explode")
def _with_ports(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    out = t.ref(stage.inputs[0]) | stage.id >> beam.ParDo(_PortsFn(stage, t.run, t.clock)).with_outputs(
        DEAD_TAG, *op.ports)
    for port in op.ports:
        t.ports[f"{stage.id}:{port}"] = out[port]
    t.dead.append(out[DEAD_TAG])


@_kernel("merge")
def _merge(t: Translation, stage: Stage) -> None:
    schemas = [t.plan.graph.schema(r) for r in stage.steps[0].inputs]
    merged = flatten([t.ref(r) for r in stage.inputs], f"{stage.id}/Flatten")
    t.ports[f"{stage.id}:out"] = merged | f"{stage.id}/Align" >> beam.ParDo(
        _MergeFn(stage, t.run, t.clock, schemas))


class _AssembleFn(_InputsFn):
    def process(self, item):
        pid, groups = item
        op = self.ops[0]
        children = list(groups["children"])
        for parent in groups["parents"]:
            t, c = time.perf_counter(), time.thread_time()
            out = op.assemble(parent, {pid: children})
            self.ctx.record(op.id, "collect", Sample(1, out.num_rows, 0, 0, 1, time.perf_counter() - t,
                                                     time.thread_time() - c, ports={"children": len(children)}))
            yield out


@_kernel("collect")
def _collect(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    step = stage.steps[0]
    schemas = [t.plan.graph.schema(r) for r in step.inputs]
    op.output_schemas(schemas)
    wanted = ["id", *op.params["fields"]]

    def kids(batch):
        for pid, row in zip(batch.column("parent_id").to_pylist(), batch.select(wanted).to_pylist()):
            yield pid, row

    def parents(batch):
        for i, pid in enumerate(batch.column("id").to_pylist()):
            yield pid, batch.slice(i, 1)

    children, parent_rows = (t.ref(r) for r in stage.inputs)
    grouped = ({"children": children | f"{stage.id}/KeyChildren" >> beam.FlatMap(kids),
                "parents": parent_rows | f"{stage.id}/KeyParents" >> beam.FlatMap(parents)}
               | f"{stage.id}/Group" >> beam.CoGroupByKey())
    t.ports[f"{stage.id}:out"] = grouped | f"{stage.id}/Assemble" >> beam.ParDo(
        _AssembleFn(stage, t.run, t.clock, schemas))


@_kernel("sink")
def _sink(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    source = stage.steps[0].inputs[0]
    schema = op.file_schema(t.plan.graph.schema(source))
    rows = t.ref(stage.inputs[0]) | f"{stage.id}/Count" >> beam.ParDo(
        _SinkFn(stage, t.run, t.clock, schema.names, answers=source != DEAD))
    writer = WRITERS.get(op.format)
    if writer is None:
        raise ValueError(f"step {stage.id!r}: a Beam runner writes {', '.join(WRITERS)}, not {op.format!r}")
    writer(t, stage, op, rows, schema)


def _parquet(t: Translation, stage: Stage, op, rows, schema) -> None:
    from apache_beam.io.parquetio import WriteToParquetBatched
    rows | f"{stage.id}/ToTable" >> beam.Map(lambda b: pa.Table.from_batches([b])) \
        | f"{stage.id}/Write" >> WriteToParquetBatched(f"{op.path}/part-{t.run}", schema, file_name_suffix=".parquet")


def _jsonl(t: Translation, stage: Stage, op, rows, schema) -> None:
    rows | f"{stage.id}/ToJson" >> beam.FlatMap(lambda b: [json.dumps(r, ensure_ascii=False) for r in b.to_pylist()]) \
        | f"{stage.id}/Write" >> beam.io.WriteToText(f"{op.path}-{t.run}", file_name_suffix=".jsonl")


WRITERS = {"parquet": _parquet, "jsonl": _jsonl}  # a sink's format -> how Beam writes it


def translate(graph: Graph | Plan, root, run: str = "run", inputs: dict | None = None, clock=time.time
              ) -> Translation:
    runner = BeamRunner()
    plan = graph if isinstance(graph, Plan) else runner.compile(graph)
    runner.check(plan)  # what no Beam runner can run is refused while the pipeline is built
    return Translation(plan, root, run, inputs, clock=clock).apply()


class BeamRunner(Executor):
    """A Beam runner (``runner``: DirectRunner, FlinkRunner, or another Beam runner's name) with
    ``argv`` its pipeline options. Beam lists every input before the first is scored and cannot
    stop reading part-way, so it refuses steps that would stop a run."""

    kinds = frozenset(PRIMITIVES)
    formats = frozenset(WRITERS)
    can_stop = False

    def __init__(self, runner: str = "DirectRunner", argv: list[str] = (), progress: bool = True):
        self.name, self.argv, self.progress = runner, list(argv), progress

    def execute(self, plan: Plan, ctx: RunContext) -> RunStats:
        self.check(plan)
        clock, wall = Clock(), time.time()
        ctx.started(plan)
        with beam_options([f"--runner={self.name}", *self.argv]) as options, _bar(self.progress), \
                _quiet_on_interrupt():
            pipeline = beam.Pipeline(options=options)
            Translation(plan, pipeline, ctx.run_id, clock=ctx.clock).apply()
            try:
                result = pipeline.run()
                result.wait_until_finish()
            except KeyboardInterrupt:  # where Beam's own handler stood in for ours
                _quiet_job_reader()
                raise
            first = _read_metrics(result, ctx, plan)
        out = stats(plan, ctx, clock(), None if first is None else max(0.0, first - wall), self.name)
        ctx.ended(out)
        return out


def _value(m):
    return m.committed if m.committed is not None else m.attempted


def _read_metrics(result, ctx: RunContext, plan: Plan) -> float | None:
    """The run's Beam metrics into ``ctx`` (per step, and the steps' own counts); the wall-clock
    time of the first answer written, or None. Read before the job server stops."""
    from apache_beam.metrics.metric import MetricsFilter
    found = result.metrics().query(MetricsFilter().with_namespace(NS))
    steps: dict[str, StepMetrics] = {}
    for c in found["counters"]:
        name, n = c.key.metric.name, _value(c) or 0
        step, sep, what = name.partition("|")
        if not sep:
            ctx.counters[name] = ctx.counters.get(name, 0) + n
            continue
        m = steps.setdefault(step, StepMetrics())
        if what.startswith("port|"):
            port = what[5:]
            m.ports[port] = m.ports.get(port, 0) + n
        elif what.startswith("reason|"):
            m.reasons[what[7:]] += n
        else:
            setattr(m, what, getattr(m, what) + n)
    first = None
    for d in found["distributions"]:
        v = _value(d)
        if v is None or not v.count:
            continue
        name = d.key.metric.name
        if name == "first_output_ms":
            first = v.min / 1000 if first is None else min(first, v.min / 1000)
            continue
        step, _, what = name.partition("|")
        m = steps.setdefault(step, StepMetrics())
        setattr(m, what.replace("_us", "_s"), getattr(m, what.replace("_us", "_s")) + v.sum / 1e6)
    for s in found.get("string_sets", ()):
        step, _, key = s.key.metric.name.partition("|note|")
        values = _value(s) or set()
        for v in values:
            ctx.notes.setdefault(step, {})[key] = json.loads(v)
    kinds = {s.id: s.kind for s in plan.graph.steps}
    for step, m in steps.items():
        m.kind = kinds.get(step, "")
        ctx.steps[step] = m
    return first


@contextlib.contextmanager
def _quiet_on_interrupt():
    """Ctrl-C: Beam is quietened at once, in the signal handler, before its own clean-up
    runs (DirectRunner runs the job in this thread, and its workers log while it unwinds)."""
    def interrupt(signum, frame):
        _quiet_job_reader()
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_job_reader() -> None:
    """After Ctrl-C the run is abandoned and the process ends at once: the threads Beam
    left behind (the job's message reader, the in-process SDK worker's gRPC streams)
    fail as the job server goes and would print tracebacks, and the worker logs the
    bundles it loses (the SDK worker prints a failed bundle's traceback to stderr
    itself). Nothing is lost that the run had committed; keep them quiet."""
    import sys
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None
    if not isinstance(sys.stderr, _MainThreadOnly):
        sys.stderr = _MainThreadOnly(sys.stderr)


class _MainThreadOnly:
    """A stream that passes on what the main thread writes and drops the rest."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _bar(enabled: bool):
    """A progress bar of rows written, on a terminal only, updated twice a second."""
    import sys

    from tqdm import tqdm
    if not (enabled and sys.stderr.isatty()):
        yield
        return
    stop = threading.Event()
    start = Progress.rows
    bar = tqdm(unit="row", smoothing=0.1)

    def poll():
        while not stop.wait(0.5):
            bar.update(Progress.rows - start - bar.n)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.close()


__all__ = ["BeamRunner", "DEAD_LETTER_SCHEMA", "DEAD_TAG", "KERNELS", "Translation", "WorkerContext", "translate"]

"""Graphs on Beam: the plan as Beam transforms, and running it.

Each stage becomes one Beam transform (``PLAN_FUNCTIONS``): a fused map is
one ``ParDo`` with the dead letters as a tagged output, a route a ``ParDo``
with a tagged output per branch, a merge a ``Flatten``, a collect a
``CoGroupByKey`` of parents and children, a sink Beam's own file IO.
Elements between stages are Arrow record batches. Operators are made once
per DoFn instance and their heavy state once per worker process
(``beamzoo.resources``), so a model is loaded once and shared by the threads.
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

from beamzoo.graph import DEAD, Graph, GraphError, Step
from beamzoo.plan import Plan, Stage, check_kinds, plan, run_fused
from beamzoo.resources import shared
from beamzoo.schemas import DEAD_LETTER_SCHEMA

DEAD_TAG = "dead_letter"
NS = "beamzoo"
PLAN_FUNCTIONS = {}


class Progress:
    """Rows that reached a sink in this process (DirectRunner, and FlinkRunner's LOOPBACK
    workers, run here): what the progress bar of a Beam run shows."""

    rows = 0
    lock = threading.Lock()

    @classmethod
    def add(cls, n: int) -> None:
        with cls.lock:
            cls.rows += n


def flatten(pcolls: list, label: str):
    """The union of ``pcolls``; one PCollection is itself. (Beam's portable Flink runner,
    job server 2.62, in batch, intermittently drops the output of a Flatten of one input:
    a pipeline's dead letters went missing in about half the runs, with exit 0.)"""
    return pcolls[0] if len(pcolls) == 1 else tuple(pcolls) | label >> beam.Flatten()


def _plans(kind):
    def deco(fn):
        PLAN_FUNCTIONS[kind] = fn
        return fn
    return deco


def _ops(steps_json: str):
    ops = [Step(**{**d, "inputs": tuple(d["inputs"]), "placement": tuple(map(tuple, d.get("placement", ())))})
           .operator() for d in json.loads(steps_json)]
    for op in ops:
        op.setup()
    return ops


def _own_counters(op) -> None:
    """A step's own counts (``op.counters()``) as Beam counters of the same names."""
    for name, n in getattr(op, "counters", dict)().items():
        if n:
            Metrics.counter(NS, name).inc(n)


def _steps_json(stage: Stage) -> str:
    return json.dumps([{"id": s.id, "kind": s.kind, "op": s.op, "params_json": s.params_json,
                        "inputs": list(s.inputs), "placement": [list(h) for h in s.placement]}
                       for s in stage.steps])


class _StageFn(beam.DoFn):
    """Fused maps: rows out, dead letters tagged, rows a step drops (resume) counted."""

    def __init__(self, stage: Stage):
        self.steps_json = _steps_json(stage)
        self.skipped = Metrics.counter(NS, "skipped")
        self.counters = {s.id: (Metrics.counter(NS, f"{s.id}_rows"), Metrics.counter(NS, f"{s.id}_failed"))
                         for s in stage.steps}

    def setup(self):
        self.ops = _ops(self.steps_json)

    def process(self, batch):
        yield from run_fused(self.ops, batch, self._piece, self.skipped.inc)

    def _piece(self, op, rows, dead):
        ok, failed = self.counters[op.id]
        ok.inc(rows.num_rows)
        _own_counters(op)
        if dead.num_rows:
            failed.inc(dead.num_rows)
            yield beam.pvalue.TaggedOutput(DEAD_TAG, dead)


class _PortsFn(beam.DoFn):
    """A route or a one-to-many step: a tagged output per port."""

    def __init__(self, stage: Stage):
        self.steps_json = _steps_json(stage)

    def setup(self):
        (self.op,) = _ops(self.steps_json)

    def process(self, batch):
        outs, dead = self.op.process(batch)
        _own_counters(self.op)
        if dead.num_rows:
            yield beam.pvalue.TaggedOutput(DEAD_TAG, dead)
        for port, b in outs.items():
            if b.num_rows:
                yield beam.pvalue.TaggedOutput(port, b)


class Translation:
    """Applies a plan's stages to a Beam pipeline; ``inputs`` feeds ``input`` sources."""

    def __init__(self, plan: Plan, root, run: str = "run", inputs: dict | None = None, chunk: int = 16):
        check_kinds(plan, PLAN_FUNCTIONS, "Beam")
        refuse_stop_gates(plan)
        self.plan, self.root, self.run, self.chunk = plan, root, run, chunk
        self.inputs = inputs or {}
        self.ports: dict[str, beam.PCollection] = {}
        self.dead: list[beam.PCollection] = []

    def ref(self, stage_ref: str):
        return self.dead_letters() if stage_ref == DEAD else self.ports[stage_ref]

    def dead_letters(self):
        if "@dead" not in self.ports:
            self.ports["@dead"] = flatten(self.dead, "DeadLetters") if self.dead else (
                self.root | "NoDeadLetters" >> beam.Create([]))
        return self.ports["@dead"]

    def apply(self) -> Translation:
        for stage in self.plan.stages:
            if DEAD not in stage.inputs:
                PLAN_FUNCTIONS[stage.kind](self, stage)
        for stage in self.plan.stages:
            if DEAD in stage.inputs:
                PLAN_FUNCTIONS[stage.kind](self, stage)
        return self


def refuse_stop_gates(plan: Plan) -> None:
    """A Beam runner lists every input before the first is scored and cannot stop its
    source part-way, so a gate's ``stop`` could not be clean here: refuse it."""
    for s in plan.graph.steps:
        if s.op == "gate" and s.params.get("action") == "stop":
            raise GraphError(f"gate step {s.id!r} ({s.params.get('spec')}): the action stop needs the edge "
                             "runner (--runner=EdgeRunner); a Beam runner cannot stop reading inputs part-way "
                             "and keep what it wrote, so use warn or divert on Beam runners")


@_plans("source")
def _source(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    if op.op_name == "input":
        t.ports[f"{stage.id}:out"] = t.inputs[stage.id]
        return
    inputs = Metrics.counter(NS, "inputs")

    def refs(_, source_step):
        src = Step(**source_step).operator()
        for r in src.refs():
            inputs.inc()
            yield r.encode("utf-8", "surrogateescape")  # a file name need not be valid UTF-8

    def to_batch(refs, source_step):
        ok, dead = _source_op(source_step).to_batch([r.decode("utf-8", "surrogateescape") for r in refs])
        if dead.num_rows:
            yield beam.pvalue.TaggedOutput(DEAD_TAG, dead)
        if ok.num_rows:
            yield ok

    s = stage.steps[0]
    step = {"id": s.id, "kind": s.kind, "op": s.op, "params_json": s.params_json, "inputs": ()}
    out = (t.root
           | f"{s.id}/Start" >> beam.Create([None])
           | f"{s.id}/List" >> beam.FlatMap(refs, step)
           | f"{s.id}/Spread" >> beam.Reshuffle()
           | f"{s.id}/Batch" >> beam.BatchElements(min_batch_size=t.chunk, max_batch_size=t.chunk)
           | f"{s.id}/ToArrow" >> beam.FlatMap(to_batch, step).with_outputs(DEAD_TAG, main="out"))
    t.ports[f"{stage.id}:out"] = out.out
    t.dead.append(out[DEAD_TAG])


def _source_op(step: dict):
    """One source operator per worker process (a manifest is read once)."""
    return shared(("source", step["op"], step["params_json"]), lambda: Step(**step).operator())


@_plans("map")
def _map(t: Translation, stage: Stage) -> None:
    label = "+".join(s.id for s in stage.steps)  # Flink names its vertices after it
    out = t.ref(stage.inputs[0]) | label >> beam.ParDo(_StageFn(stage)).with_outputs(DEAD_TAG, main="out")
    t.ports[f"{stage.id}:out"] = out.out
    t.dead.append(out[DEAD_TAG])


@_plans("route")
@_plans("explode")
def _with_ports(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    out = t.ref(stage.inputs[0]) | stage.id >> beam.ParDo(_PortsFn(stage)).with_outputs(DEAD_TAG, *op.ports)
    for port in op.ports:
        t.ports[f"{stage.id}:{port}"] = out[port]
    t.dead.append(out[DEAD_TAG])


@_plans("merge")
def _merge(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    op.output_schemas([t.plan.graph.schema(r) for r in stage.steps[0].inputs])
    merged = flatten([t.ref(r) for r in stage.inputs], f"{stage.id}/Flatten")
    t.ports[f"{stage.id}:out"] = merged | f"{stage.id}/Align" >> beam.Map(lambda b: op.process(b).ok)


@_plans("collect")
def _collect(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    step = stage.steps[0]
    op.output_schemas([t.plan.graph.schema(r) for r in step.inputs])
    wanted = ["id", *op.params["fields"]]

    def kids(batch):
        for pid, row in zip(batch.column("parent_id").to_pylist(), batch.select(wanted).to_pylist()):
            yield pid, row

    def parents(batch):
        for i, pid in enumerate(batch.column("id").to_pylist()):
            yield pid, batch.slice(i, 1)

    def assemble(item):
        pid, groups = item
        for parent in groups["parents"]:
            yield op.assemble(parent, {pid: list(groups["children"])})

    children, parent_rows = (t.ref(r) for r in stage.inputs)
    grouped = ({"children": children | f"{stage.id}/KeyChildren" >> beam.FlatMap(kids),
                "parents": parent_rows | f"{stage.id}/KeyParents" >> beam.FlatMap(parents)}
               | f"{stage.id}/Group" >> beam.CoGroupByKey())
    t.ports[f"{stage.id}:out"] = grouped | f"{stage.id}/Assemble" >> beam.FlatMap(assemble)


@_plans("sink")
def _sink(t: Translation, stage: Stage) -> None:
    (op,) = stage.operators()
    source = stage.steps[0].inputs[0]
    schema = op.file_schema(t.plan.graph.schema(source))
    dead = source == DEAD
    counter = Metrics.counter(NS, "failed" if dead else "scored")
    clock = None if dead else Metrics.distribution(NS, "first_output_ms")
    names = schema.names

    def count(batch):
        counter.inc(batch.num_rows)
        Progress.add(batch.num_rows)
        if clock is not None:
            clock.update(int(time.time() * 1000))
        return batch.select(names)

    rows = t.ref(stage.inputs[0]) | f"{stage.id}/Count" >> beam.Map(count)
    path = op.params["path"]
    if op.op_name == "parquet":
        from apache_beam.io.parquetio import WriteToParquetBatched
        rows | f"{stage.id}/ToTable" >> beam.Map(lambda b: pa.Table.from_batches([b])) \
            | f"{stage.id}/Write" >> WriteToParquetBatched(f"{path}/part-{t.run}", schema,
                                                           file_name_suffix=".parquet")
    else:
        rows | f"{stage.id}/ToJson" >> beam.FlatMap(lambda b: [json.dumps(r, ensure_ascii=False)
                                                              for r in b.to_pylist()]) \
            | f"{stage.id}/Write" >> beam.io.WriteToText(f"{path}-{t.run}", file_name_suffix=".jsonl")


def translate(graph: Graph, root, run: str = "run", inputs: dict | None = None) -> Translation:
    return Translation(plan(graph), root, run, inputs).apply()


def run(graph: Graph, argv: list[str], run_name: str, progress: bool = True):
    """Run ``graph`` on the Beam runner ``argv`` names; returns the finished result."""
    from beamzoo.runners.options import beam_options
    with beam_options(argv) as options, _bar(progress), _quiet_on_interrupt():
        pipeline = beam.Pipeline(options=options)
        translate(graph, pipeline, run_name)
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except KeyboardInterrupt:  # where Beam's own handler stood in for ours
            _quiet_job_reader()
            raise
        return _Metrics(result)


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


class _Metrics:
    """The counts of a finished Beam run, read from its metrics (before its job server stops)."""

    def __init__(self, result):
        from apache_beam.metrics.metric import MetricsFilter
        found = result.metrics().query(MetricsFilter().with_namespace(NS))
        self.counters = {}
        for c in found["counters"]:
            value = c.committed if c.committed is not None else c.attempted
            self.counters[c.key.metric.name] = self.counters.get(c.key.metric.name, 0) + (value or 0)
        firsts = [d.committed or d.attempted for d in found["distributions"]
                  if d.key.metric.name == "first_output_ms"]
        firsts = [v.min for v in firsts if v is not None and v.count]
        self.first_output = min(firsts) / 1000 if firsts else None


__all__ = ["DEAD_LETTER_SCHEMA", "DEAD_TAG", "PLAN_FUNCTIONS", "Translation", "run", "translate"]

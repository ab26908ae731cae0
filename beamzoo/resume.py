"""Resumable runs: every row carries a key of what was scored.

key = sha256(content sha256 of the input file, graph version), where the
graph version is the fingerprint of the graph's processing steps (every knob
that changes results, the model's sha256, ...). ``with_keys`` adds, before
planning, a ``resume_key`` step after the step that reads the files; with
``resume`` it drops rows whose (id, key) a committed output already holds, and
a ``resume_skip`` step after the source drops inputs that failed before they
had a key (they could not be read). A changed file or another model version
gets a new key and is scored again.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from beamzoo.core import NO_DEAD_LETTERS, Knob, Operator, Result, register
from beamzoo.graph import Graph, Step, split_ref
from beamzoo.schemas import ID

PROCESSING = ("map", "explode", "route", "merge", "collect")


class CorruptOutput(RuntimeError):
    """A file among the outputs cannot be read."""


def run_id() -> str:
    """Sorts by start time; unique across processes."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def sink_dirs(graph: Graph) -> list[str]:
    """The folders of the graph's Parquet sinks."""
    return [s.params["path"] for s in graph.steps if s.op == "parquet"]


def output_files(directories: list[str]) -> list[str]:
    return sorted(f for d in directories for f in glob.glob(os.path.join(glob.escape(d), "*.parquet")))


class OutputNotEmpty(FileExistsError):
    """The output already holds results, and the run is not a resume."""


def check_outputs(graph: Graph, resume: bool) -> None:
    if output_files(sink_dirs(graph)) and not resume:
        where = ", ".join(d for d in sink_dirs(graph) if output_files([d]))
        raise OutputNotEmpty(f"{where} already holds results of an earlier run; pass --resume to "
                              "continue it (inputs already done are skipped), or choose an empty output")


def done_rows(directories: list[str]) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """(id, key) pairs already committed, and ids that failed before getting a key.

    Read once per state of the folders: committed files only ever appear whole
    (renamed into place), so their names, sizes and times identify it.
    """
    files = output_files(directories)
    with _reading:  # worker threads set up at once: one of them reads
        return _read_done(tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files))


_reading = threading.Lock()


@functools.lru_cache(maxsize=4)
def _read_done(files: tuple[tuple[str, int, int], ...]):
    keyed, unkeyed = set(), set()
    for f, _, _ in files:
        try:
            table = pq.read_table(f, columns=["id", "key"])
        except Exception as exc:
            raise CorruptOutput(
                f"output file {f} cannot be read ({type(exc).__name__}: {exc}). It is not a complete "
                f"beamzoo output: move it out of the folder (e.g. mv '{f}' '{f}.bad') and resume again; "
                "the inputs it held are then scored again") from None
        for rid, key in zip(table.column("id").to_pylist(), table.column("key").to_pylist()):
            (unkeyed.add(rid) if key is None else keyed.add((rid, key)))
    return frozenset(keyed), frozenset(unkeyed)


@register("resume_skip")
class SkipDone(Operator):
    """Drops inputs whose earlier dead letter has no key (they failed before being read)."""

    default_id = "resume_skip"
    knobs = {"outputs": Knob(None, list, results=False)}
    requires = pa.schema([ID])

    def __init__(self, outputs: list[str], id: str | None = None):
        super().__init__(id, outputs=list(outputs))

    def setup(self):
        self._skip = done_rows(self.params["outputs"])[1]

    def process(self, batch):
        if not hasattr(self, "_skip"):
            self.setup()
        if not self._skip:
            return Result(batch, NO_DEAD_LETTERS)
        keep = [i for i, r in enumerate(batch.column("id").to_pylist()) if r not in self._skip]
        return Result(batch.take(pa.array(keep, pa.int64())), NO_DEAD_LETTERS)


@register("resume_key")
class Key(Operator):
    """data -> key; with ``outputs``, drops rows whose (id, key) is already committed there."""

    default_id = "key"
    knobs = {"version": Knob(None, str), "outputs": Knob(None, list, results=False)}
    requires = pa.schema([ID, pa.field("data", pa.binary())])
    produces = pa.schema([pa.field("key", pa.string())])

    def __init__(self, version: str, outputs: list[str] | None = None, id: str | None = None):
        super().__init__(id, version=version, outputs=list(outputs) if outputs else None)

    def setup(self):
        outputs = self.params["outputs"]
        self._done = done_rows(outputs)[0] if outputs else frozenset()

    def key(self, data: bytes) -> str:
        content = hashlib.sha256(data).hexdigest()
        return hashlib.sha256(f"{content}:{self.params['version']}".encode()).hexdigest()

    def process(self, batch: pa.RecordBatch) -> Result:
        if not hasattr(self, "_done"):
            self.setup()
        keys = [self.key(d) for d in batch.column("data").to_pylist()]
        ids = batch.column("id").to_pylist()
        keep = [i for i, (r, k) in enumerate(zip(ids, keys)) if (r, k) not in self._done]
        out = batch.append_column(self.produces.field("key"), pa.array(keys, pa.string()))
        if len(keep) != len(keys):
            out = out.take(pa.array(keep, pa.int64()))
        return Result(out, NO_DEAD_LETTERS)


def with_keys(graph: Graph, resume: bool) -> Graph:
    """The graph with a key step after the step that reads the files (and, with
    ``resume``, a skip step after the source); unchanged if nothing reads files."""
    read = next((s for s in graph.steps if s.op == "read_files"), None)
    if read is None:
        return graph
    version = graph.fingerprint(PROCESSING)[:16]
    outputs = sink_dirs(graph) if resume else None
    key = Step.of(Key(version, outputs), (read.id,))
    source_id = split_ref(read.inputs[0])[0]
    skip = Step.of(SkipDone(outputs), (read.inputs[0],)) if resume else None

    def rewire(s: Step) -> Step:
        refs = tuple(key.id if split_ref(r) == (read.id, "out") else r for r in s.inputs)
        if skip is not None and s is read:
            refs = (skip.id,)
        return Step(s.id, s.kind, s.op, s.params_json, refs)

    steps = []
    for s in graph.steps:
        steps.append(rewire(s))
        if s.id == source_id and skip is not None:
            steps.append(skip)
        if s is read:
            steps.append(key)
    return Graph(tuple(steps))

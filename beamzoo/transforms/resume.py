"""Resumable runs: every row carries a key of what was scored.

key = sha256(content sha256 of the input, graph version), where the graph
version is the fingerprint of the graph's processing steps (every knob that
changes results, the model's sha256, ...). ``keying(outputs, resume)`` is a
compiler pass: it adds a ``resume_key`` step after the step that loads each
input's content (``Operator.loads_input``); with ``resume`` that step drops
rows whose (id, key) a committed output already holds, and a ``resume_skip``
step after the source drops inputs that failed before they had a key (they
could not be read). A changed file or another model version gets a new key
and is scored again. The folders read back are those of the graph's
resumable sinks (``Sink.resumable``).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from beamzoo.core.compile import derived, rewire
from beamzoo.core.graph import DEAD, Graph
from beamzoo.core.knobs import Knob
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result
from beamzoo.core.registry import op_class
from beamzoo.core.schemas import ID

PROCESSING = ("map", "explode", "route", "merge", "collect")


class CorruptOutput(RuntimeError):
    """A file among the outputs cannot be read."""


class OutputNotEmpty(FileExistsError):
    """The output already holds results, and the run is not a resume."""


def sink_ops(graph: Graph) -> list[Operator]:
    """The operators of the graph's sinks."""
    return [s.operator() for s in graph.steps if s.kind == "sink"]


def sink_dirs(graph: Graph) -> list[str]:
    """The folders of the graph's resumable sinks (their rows can be read back)."""
    return [op.path for op in sink_ops(graph) if op.resumable]


def output_files(directories: list[str]) -> list[str]:
    return sorted(f for d in directories for f in glob.glob(os.path.join(glob.escape(d), "*.parquet")))


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


class SkipDone(Operator):
    """Drops inputs whose earlier dead letter has no key (they failed before being read)."""

    name = "resume_skip"
    default_id = "resume_skip"
    knobs = {"outputs": Knob(None, list, results=False, doc="the output folders read back")}
    positional = ("outputs",)
    requires = pa.schema([ID])
    drops_rows = True

    def setup(self):
        self._skip = done_rows(self.params["outputs"] or [])[1]

    def process(self, batch):
        self.bind()
        if not self._skip:
            return Result(batch, NO_DEAD_LETTERS)
        keep = [i for i, r in enumerate(batch.column("id").to_pylist()) if r not in self._skip]
        return Result(batch.take(pa.array(keep, pa.int64())), NO_DEAD_LETTERS)


class Key(Operator):
    """data -> key; with ``outputs``, drops rows whose (id, key) is already committed there."""

    name = "resume_key"
    default_id = "key"
    knobs = {"version": Knob(None, str, required=True, doc="the graph version the key holds"),
             "outputs": Knob(None, list, results=False, doc="the output folders read back")}
    positional = ("version", "outputs")
    requires = pa.schema([ID, pa.field("data", pa.binary())])
    produces = pa.schema([pa.field("key", pa.string())])
    drops_rows = True

    def setup(self):
        outputs = self.params["outputs"]
        self._done = done_rows(outputs)[0] if outputs else frozenset()

    def key(self, data: bytes) -> str:
        content = hashlib.sha256(data).hexdigest()
        return hashlib.sha256(f"{content}:{self.params['version']}".encode()).hexdigest()

    def process(self, batch: pa.RecordBatch) -> Result:
        self.bind()
        keys = [self.key(d) for d in batch.column("data").to_pylist()]
        ids = batch.column("id").to_pylist()
        keep = [i for i, (r, k) in enumerate(zip(ids, keys)) if (r, k) not in self._done]
        out = batch.append_column(self.produces.field("key"), pa.array(keys, pa.string()))
        if len(keep) != len(keys):
            out = out.take(pa.array(keep, pa.int64()))
        return Result(out, NO_DEAD_LETTERS)


def keying(outputs: list[str] | None, resume: bool):
    """The compiler pass that keys rows for resume (see the module's doc); ``outputs``: the
    folders a resume reads back. A graph with no step that loads inputs is left as it is."""
    def keyed(graph: Graph) -> Graph:
        loader = next((s for s in graph.steps if s.kind == "map" and op_class(s.op).loads_input), None)
        if loader is None:
            return graph
        version = graph.fingerprint(PROCESSING)[:16]
        done = list(outputs or []) if resume else None
        key = derived(Key(version, done, id=_free(graph, "key")), (loader.id,), like=loader)
        moves = {f"{loader.id}:out": key.id}
        if not resume or loader.inputs[0] == DEAD:
            return rewire(graph, add=[key], moves=moves)
        skip = derived(SkipDone(done, id=_free(graph, "resume_skip")), loader.inputs, like=loader)
        return rewire(graph, add=[key, skip], moves=moves, reads={loader.id: (skip.id,)})
    return keyed


def _free(graph: Graph, name: str) -> str:
    ids = {s.id for s in graph.steps}
    if name not in ids:
        return name
    n = 2
    while f"{name}_{n}" in ids:
        n += 1
    return f"{name}_{n}"


__all__ = ["CorruptOutput", "Key", "OutputNotEmpty", "PROCESSING", "SkipDone", "check_outputs", "done_rows",
           "keying", "output_files", "sink_dirs", "sink_ops"]

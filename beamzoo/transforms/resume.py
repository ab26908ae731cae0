"""Resumable runs: every row carries a key of what was scored.

A key holds the graph version, the fingerprint of the graph's processing steps
(every knob that changes results, the model's sha256, ...), so another model
version gets new keys and is scored again. ``resume_by`` says what else it holds:

- ``stat`` (the default): what the file system already knows of the input, its
  path, size and modification time (``mtime_ns``), or an object's size and
  ETag/generation (``beamzoo.transforms.io.file_stamp``). The key is made
  before the input is read, so a resume skips what is done without opening it.
  A file that changed (size, time, ETag) is scored again; so is a file that was
  only touched (a new time, the same bytes): that is the trade for not reading.
  Inputs with nothing to stat (http(s) URLs, a manifest row without a path) are
  keyed by content instead.
- ``content``: the sha256 of the input's bytes. Every input is read and hashed
  on a resume; a touched file with the same bytes is not scored again.

Stat keys start with ``stat:``, so the two kinds never match each other and a
mismatch only ever means "not done". A resume by content over outputs keyed
by stat scores those inputs again. A resume by stat over outputs keyed by
content checks those inputs by content: they are read, skipped where their
content is done, and scored under a stat key where it is not.

``keying(outputs, resume, by)`` is a compiler pass: it adds a ``resume_key``
step after the step that loads each input's content (``Operator.loads_input``)
and, by stat, a ``resume_stat_key`` step before it. With ``resume`` those steps
drop rows whose (id, key) a committed output already holds, and a
``resume_skip`` step before the loader drops inputs that failed before they had
a key (they could not be read). The folders read back are those of the graph's
resumable sinks (``Sink.resumable``).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import threading
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from beamzoo.core.compile import derived, rewire
from beamzoo.core.graph import DEAD, Graph
from beamzoo.core.knobs import Knob
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result
from beamzoo.core.registry import op_class
from beamzoo.core.schemas import ID, PATH
from beamzoo.transforms.io import file_stamp

PROCESSING = ("map", "explode", "route", "merge", "collect")
RESUME_BY = Knob("stat", str, choices=("stat", "content"), results=False,
                 doc="what tells a resume that an input is done: stat (its path, size and modification time, "
                     "or an object's ETag: nothing is read; a touched file is scored again) or content "
                     "(the sha256 of its bytes: every input is read)")
STAT = "stat:"  # the prefix of keys made from what the file system knows
KEY = pa.field("key", pa.string())


class CorruptOutput(RuntimeError):
    """A file among the outputs cannot be read."""


class OutputNotEmpty(FileExistsError):
    """The output already holds results, and the run is not a resume."""


class Done(NamedTuple):
    """What committed outputs hold: (id, key) pairs, ids that failed before getting a key,
    and ids done only under content keys (so a resume by stat checks them by content)."""

    keyed: frozenset[tuple[str, str]]
    unkeyed: frozenset[str]
    by_content: frozenset[str]


NOTHING_DONE = Done(frozenset(), frozenset(), frozenset())


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


def done_rows(directories: list[str]) -> Done:
    """What is already committed (``Done``).

    Read once per state of the folders: committed files only ever appear whole
    (renamed into place), so their names, sizes and times identify it.
    """
    files = output_files(directories)
    with _reading:  # worker threads set up at once: one of them reads
        return _read_done(tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files))


_reading = threading.Lock()


@functools.lru_cache(maxsize=4)
def _read_done(files: tuple[tuple[str, int, int], ...]) -> Done:
    keyed, unkeyed, by_stat = set(), set(), set()
    for f, _, _ in files:
        try:
            table = pq.read_table(f, columns=["id", "key"])
        except Exception as exc:
            raise CorruptOutput(
                f"output file {f} cannot be read ({type(exc).__name__}: {exc}). It is not a complete "
                f"beamzoo output: move it out of the folder (e.g. mv '{f}' '{f}.bad') and resume again; "
                "the inputs it held are then scored again") from None
        for rid, key in zip(table.column("id").to_pylist(), table.column("key").to_pylist()):
            if key is None:
                unkeyed.add(rid)
            else:
                keyed.add((rid, key))
                if key.startswith(STAT):
                    by_stat.add(rid)
    by_content = {rid for rid, key in keyed if not key.startswith(STAT)} - by_stat
    return Done(frozenset(keyed), frozenset(unkeyed), frozenset(by_content))


def _done(outputs: list[str] | None) -> Done:
    return done_rows(outputs) if outputs else NOTHING_DONE


def _keep(batch: pa.RecordBatch, keep: list[int]) -> pa.RecordBatch:
    return batch if len(keep) == batch.num_rows else batch.take(pa.array(keep, pa.int64()))


class SkipDone(Operator):
    """Drops inputs whose earlier dead letter has no key (they failed before being read)."""

    name = "resume_skip"
    default_id = "resume_skip"
    knobs = {"outputs": Knob(None, list, results=False, doc="the output folders read back")}
    positional = ("outputs",)
    requires = pa.schema([ID])
    drops_rows = True

    def setup(self):
        self._skip = _done(self.params["outputs"]).unkeyed

    def process(self, batch):
        self.bind()
        if not self._skip:
            return Result(batch, NO_DEAD_LETTERS)
        keep = [i for i, r in enumerate(batch.column("id").to_pylist()) if r not in self._skip]
        return Result(_keep(batch, keep), NO_DEAD_LETTERS)


def _hashed(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class StatKey(Operator):
    """path -> key from what the file system knows of the input (``file_stamp``), before it is
    read; with ``outputs``, drops rows whose (id, key) is already committed there. A row with
    nothing to stat gets no key here (``resume_key`` keys it by content once it is read)."""

    name = "resume_stat_key"
    default_id = "stat_key"
    knobs = {"version": Knob(None, str, required=True, doc="the graph version the key holds"),
             "outputs": Knob(None, list, results=False, doc="the output folders read back")}
    positional = ("version", "outputs")
    requires = pa.schema([ID, PATH])
    produces = pa.schema([KEY])
    drops_rows = True

    def setup(self):
        self._done = _done(self.params["outputs"])

    def key(self, path: str | None) -> str | None:
        stamp = file_stamp(path)
        return None if stamp is None else STAT + _hashed(f"{path}\0{stamp}\0{self.params['version']}")

    def process(self, batch: pa.RecordBatch) -> Result:
        self.bind()
        done = self._done
        keys = [self.key(p) for p in batch.column("path").to_pylist()]
        ids = batch.column("id").to_pylist()
        keep = [i for i, (r, k) in enumerate(zip(ids, keys)) if k is None or (r, k) not in done.keyed]
        out = batch.append_column(KEY, pa.array(keys, pa.string()))
        return Result(_keep(out, keep), NO_DEAD_LETTERS)


class Key(Operator):
    """data -> key (the sha256 of the content and the graph version), for rows that have
    none yet; with ``outputs``, drops those whose (id, key) is already committed there. A row
    keyed by stat whose id is done only under content keys is checked by its content: dropped
    if that is done, else it keeps its stat key (the next resume needs no read)."""

    name = "resume_key"
    default_id = "key"
    knobs = {"version": Knob(None, str, required=True, doc="the graph version the key holds"),
             "outputs": Knob(None, list, results=False, doc="the output folders read back")}
    positional = ("version", "outputs")
    requires = pa.schema([ID, pa.field("data", pa.binary())])
    produces = pa.schema([KEY])
    drops_rows = True

    def setup(self):
        self._done = _done(self.params["outputs"])

    def produced(self, inputs):
        return [] if "key" in inputs[0].names else ["key"]  # keyed by stat before: fills in the rest

    def key(self, data: bytes) -> str:
        content = hashlib.sha256(data).hexdigest()
        return hashlib.sha256(f"{content}:{self.params['version']}".encode()).hexdigest()

    def process(self, batch: pa.RecordBatch) -> Result:
        self.bind()
        done = self._done
        given = batch.column("key").to_pylist() if "key" in batch.schema.names else [None] * batch.num_rows
        ids = batch.column("id").to_pylist()
        check = [i for i, (r, k) in enumerate(zip(ids, given)) if k is None or r in done.by_content]
        if not check and "key" in batch.schema.names:
            return Result(batch, NO_DEAD_LETTERS)
        data, keys, drop = batch.column("data"), list(given), set()
        for i in check:
            content = self.key(data[i].as_py())
            if (ids[i], content) in done.keyed:
                drop.add(i)
            elif keys[i] is None:
                keys[i] = content
        keep = [i for i in range(batch.num_rows) if i not in drop]
        if "key" in batch.schema.names:
            batch = batch.drop_columns(["key"])
        out = batch.append_column(KEY, pa.array(keys, pa.string()))
        return Result(_keep(out, keep), NO_DEAD_LETTERS)


def keying(outputs: list[str] | None, resume: bool, by: str = RESUME_BY.default):
    """The compiler pass that keys rows for resume (see the module's doc); ``outputs``: the
    folders a resume reads back; ``by``: ``stat`` or ``content`` (``RESUME_BY``). A graph with
    no step that loads inputs is left as it is."""
    by = RESUME_BY.check("keying", "resume_by", by)

    def keyed(graph: Graph) -> Graph:
        loader = next((s for s in graph.steps if s.kind == "map" and op_class(s.op).loads_input), None)
        if loader is None:
            return graph
        version = graph.fingerprint(PROCESSING)[:16]
        done = list(outputs or []) if resume else None
        key = derived(Key(version, done, id=_free(graph, "key")), (loader.id,), like=loader)
        add, upstream = [key], loader.inputs
        if loader.inputs[0] != DEAD:
            if by == "stat":
                stat = derived(StatKey(version, done, id=_free(graph, "stat_key")), upstream, like=loader)
                add.append(stat)
                upstream = (stat.id,)
            if resume:
                skip = derived(SkipDone(done, id=_free(graph, "resume_skip")), upstream, like=loader)
                add.append(skip)
                upstream = (skip.id,)
        reads = {loader.id: upstream} if upstream != loader.inputs else None
        return rewire(graph, add=add, moves={f"{loader.id}:out": key.id}, reads=reads)
    return keyed


def _free(graph: Graph, name: str) -> str:
    ids = {s.id for s in graph.steps}
    if name not in ids:
        return name
    n = 2
    while f"{name}_{n}" in ids:
        n += 1
    return f"{name}_{n}"


__all__ = ["CorruptOutput", "Done", "Key", "OutputNotEmpty", "PROCESSING", "RESUME_BY", "STAT", "SkipDone",
           "StatKey", "check_outputs", "done_rows", "keying", "output_files", "sink_dirs", "sink_ops"]

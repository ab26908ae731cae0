"""Resumable runs: every row carries a key of what was scored.

key = sha256(content sha256 of the input file, graph version), where the graph
version hashes every step's fingerprint (preprocessing settings, the model's
sha256, ...). A resumed run skips an input when a committed output file
already holds a row with its path and key; a changed file or a new model
version gets a new key and is scored again. Inputs that could not even be read
have no key and are skipped by path.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from beamzoo.core import NO_DEAD_LETTERS, Graph, Operator, Result, Source
from beamzoo.schemas import PATH

OUTPUTS = ("predictions", "dead_letter")


def graph_version(graph: Graph) -> str:
    text = json.dumps(graph.fingerprint(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id() -> str:
    """Sorts by start time; unique across processes."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def output_files(directory: str) -> list[str]:
    return sorted(f for prefix in OUTPUTS for f in glob.glob(os.path.join(directory, f"{prefix}-*.parquet")))


def check_output_dir(directory: str, resume: bool) -> None:
    if output_files(directory) and not resume:
        raise FileExistsError(
            f"{directory} already holds results of an earlier run; pass --resume to continue "
            "it (inputs already scored are skipped), or choose an empty directory")


def done_rows(directory: str) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """(path, key) pairs already committed, and paths that failed before getting a key.

    Read once per state of the folder: committed files only ever appear
    whole (renamed into place), so their names, sizes and times identify it.
    """
    files = output_files(directory)
    return _read_done(tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=1)  # one folder: a resumed run reads it in select() and Key
def _read_done(files: tuple[tuple[str, int, int], ...]):
    keyed, unkeyed = set(), set()
    for f, _, _ in files:
        table = pq.read_table(f, columns=["path", "key"])
        for path, key in zip(table.column("path").to_pylist(), table.column("key").to_pylist()):
            if key is None:
                unkeyed.add(path)
            else:
                keyed.add((path, key))
    return frozenset(keyed), frozenset(unkeyed)


class ResumableSource(Source):
    """A source that leaves out the paths a resumed run must not read again."""

    def __init__(self, pattern: str, directory: str):
        super().__init__(pattern)
        self.directory = directory

    def select(self, paths: list[str]) -> list[str]:
        _, unkeyed = done_rows(self.directory)
        return [p for p in super().select(paths) if p not in unkeyed]


class Key(Operator):
    """data -> key; with ``resume_from``, drops rows whose (path, key) is already committed."""

    requires = pa.schema([PATH, pa.field("data", pa.binary())])
    produces = pa.schema([pa.field("key", pa.string())])

    def __init__(self, version: str, resume_from: str | None = None, name: str = "key"):
        super().__init__(name)
        self.version, self.resume_from = version, resume_from
        self._done = None

    def setup(self):
        if self._done is None:
            self._done = done_rows(self.resume_from)[0] if self.resume_from else set()

    def __getstate__(self):
        return {**self.__dict__, "_done": None}

    def key(self, data: bytes) -> str:
        content = hashlib.sha256(data).hexdigest()
        return hashlib.sha256(f"{content}:{self.version}".encode()).hexdigest()

    def process(self, batch: pa.RecordBatch) -> Result:
        self.setup()
        keys = [self.key(d) for d in batch.column("data").to_pylist()]
        paths = batch.column("path").to_pylist()
        keep = [i for i, (p, k) in enumerate(zip(paths, keys)) if (p, k) not in self._done]
        out = batch.append_column(self.produces.field("key"), pa.array(keys, pa.string()))
        if len(keep) != len(keys):
            out = out.take(pa.array(keep, pa.int64()))
        return Result(out, NO_DEAD_LETTERS)


def with_keys(graph: Graph, output: str, resume: bool) -> Graph:
    """The graph with a Key step after the step that reads the files."""
    version = graph_version(graph)
    at = next((i for i, s in enumerate(graph.steps) if "data" in s.produces.names), None)
    if at is None:
        raise ValueError("a resumable graph needs a step that produces the file bytes ('data')")
    source = ResumableSource(graph.source.pattern, output) if resume else graph.source
    keyed = Graph(source)
    for i, step in enumerate(graph.steps):
        keyed = keyed | step
        if i == at:
            keyed = keyed | Key(version, output if resume else None)
    return keyed

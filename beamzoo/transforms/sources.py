"""Sources: where a graph's records come from.

Each source gives every record an ``id``: a file's path, a manifest's
``row:N``, or an in-memory row's own ``id`` field (else ``row:N``). A source
lists references (``refs``) and turns a list of them into a record batch
(``to_batch``), so an executor can list once and spread the work. ``input_knob``
names the knob that says what it reads (what a bundle's ``--input`` fills in).
"""
from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result, dead_letters
from beamzoo.core.schemas import ID, PATH
from beamzoo.transforms.io import any_file, encodable, is_remote, iter_files, printable


class NoInputs(FileNotFoundError):
    """Nothing matches an input pattern."""


class Source(Operator):
    kind = "source"
    parallel = False
    external = False  # fed from outside the graph, not listed
    input_knob: str | None = None  # the knob naming what it reads

    def check_inputs(self) -> None:
        """Raise (a user's mistake) when there is nothing to read; called before a run."""

    def output_schemas(self, inputs):
        return {"out": self.schema}

    @property
    def schema(self) -> pa.Schema:
        raise NotImplementedError

    def refs(self) -> Iterator[str]:
        """The references of every record, as a listing finds them."""
        raise NotImplementedError

    def to_batch(self, refs: list[str]) -> Result:
        raise NotImplementedError


def _ids_paths(paths: list[str]) -> pa.RecordBatch:
    arr = pa.array(paths, pa.string())
    return pa.record_batch([arr, arr], schema=pa.schema([ID, PATH]))


def _local_path(p):
    p = os.fspath(p)
    return p if not isinstance(p, str) or is_remote(p) else os.path.abspath(p.removeprefix("file://"))


class Files(Source):
    """Files matching a glob (``**`` recurses), a directory (its images) or an fsspec URL
    pattern -> ``id`` and ``path`` (both the file's path; local paths made absolute,
    so workers started elsewhere find them). A name that is not valid UTF-8 becomes
    a dead letter of step ``list``."""

    name = "files"
    default_id = "files"
    knobs = {"pattern": Knob(None, str, doc="glob, directory or URL pattern", convert=_local_path, required=True)}
    positional = ("pattern",)
    input_knob = "pattern"

    def check_inputs(self):
        if not any_file(self.params["pattern"]):
            raise NoInputs(f"no files match {self.params['pattern']!r}; check the pattern, and quote it so the "
                           "shell does not expand it (e.g. --input 'photos/**/*.jpg')")

    @property
    def schema(self):
        return pa.schema([ID, PATH])

    def refs(self):
        return iter_files(self.params["pattern"])

    def to_batch(self, refs):
        good = [r for r in refs if encodable(r)]
        if len(good) == len(refs):
            return Result(_ids_paths(refs), NO_DEAD_LETTERS)
        bad = _ids_paths([printable(r) for r in refs if not encodable(r)])
        error = "file name is not valid UTF-8; rename the file to score it"
        return Result(_ids_paths(good),
                      dead_letters(bad, list(range(bad.num_rows)), "list", [error] * bad.num_rows))


def _read_table(path: str) -> pa.Table:
    if path.lower().endswith((".csv", ".csv.gz")):
        import pyarrow.csv as csv
        with _open(path) as f:
            return csv.read_csv(f)
    import pyarrow.parquet as pq
    with _open(path) as f:
        return pq.read_table(f)


def _open(path: str):
    if is_remote(path):
        import fsspec
        return fsspec.open(path, "rb")
    return open(path, "rb")


class Manifest(Source):
    """A Parquet or CSV table with one input per row: its ``uri_column`` becomes
    ``path`` and its other columns pass through to the outputs; ids are ``row:N``."""

    name = "manifest"
    default_id = "manifest"
    knobs = {"table": Knob(None, str, doc="the Parquet or CSV file", convert=_local_path, required=True),
             "uri_column": Knob("uri", str, doc="the column with each input's path or URL")}
    positional = ("table",)
    input_knob = "table"

    def configure(self):
        self._table = None

    def table(self) -> pa.Table:
        if self._table is None:
            t = _read_table(self.params["table"])
            col = self.params["uri_column"]
            if col not in t.schema.names:
                raise ValueError(f"manifest {self.params['table']} has no column {col!r} "
                                 f"(it has {', '.join(t.schema.names)}); pass uri_column=...")
            clash = {"id", "path"} & (set(t.schema.names) - {col})
            if clash:
                raise ValueError(f"manifest {self.params['table']} has a column named "
                                 f"{', '.join(sorted(clash))}, which beamzoo sets; rename it")
            uris = t.column(col).cast(pa.string())
            rest = t.drop_columns([col])
            ids = pa.array([f"row:{i}" for i in range(t.num_rows)], pa.string())
            self._table = pa.table([ids, uris, *rest.columns],
                                   schema=pa.schema([ID, PATH.with_nullable(True), *rest.schema]))
        return self._table

    @property
    def schema(self):
        return self.table().schema

    def refs(self):
        return (str(i) for i in range(self.table().num_rows))

    def to_batch(self, refs):
        taken = self.table().take(pa.array([int(r) for r in refs], pa.int64()))
        return Result(taken.combine_chunks().to_batches()[0] if taken.num_rows else
                      pa.RecordBatch.from_pylist([], schema=taken.schema), NO_DEAD_LETTERS)


class Rows(Source):
    """In-memory rows (a list of dicts of JSON values), for tests and serving.
    A row's ``id`` field is its id; else it gets ``row:N``."""

    name = "rows"
    default_id = "rows"
    knobs = {"rows": Knob(None, list, doc="the rows, each a dict", convert=lambda rows: [dict(r) for r in rows],
                          required=True)}
    positional = ("rows",)

    def configure(self):
        rows = self.params["rows"]
        self._batch = None
        if not rows:
            raise ValueError("Rows needs at least one row (its columns make the schema)")

    def batch(self) -> pa.RecordBatch:
        if self._batch is None:
            rows = [{"id": r.get("id", f"row:{i}"), **{k: v for k, v in r.items() if k != "id"}}
                    for i, r in enumerate(self.params["rows"])]
            t = pa.Table.from_pylist(rows)
            fields = [ID if f.name == "id" else f for f in t.schema]
            self._batch = t.cast(pa.schema(fields)).combine_chunks().to_batches()[0]
        return self._batch

    @property
    def schema(self):
        return self.batch().schema

    def refs(self):
        return (str(i) for i in range(len(self.params["rows"])))

    def to_batch(self, refs):
        return Result(self.batch().take(pa.array([int(r) for r in refs], pa.int64())), NO_DEAD_LETTERS)


class Input(Source):
    """A graph's open input: batches fed from outside the graph (a Beam PCollection, in a
    user's Beam pipeline), laid out as ``schema`` (Arrow IPC, base64)."""

    name = "input"
    default_id = "input"
    knobs = {"schema": Knob(None, str, results=False, doc="the Arrow schema of the batches",
                            convert=lambda s: base64.b64encode(s.serialize().to_pybytes()).decode()
                            if isinstance(s, pa.Schema) else s, required=True)}
    positional = ("schema",)
    external = True  # its batches come from outside: an executor is handed them

    @property
    def schema(self):
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.params["schema"])))

    def refs(self):
        raise RuntimeError("an input step is fed from outside the graph; it lists nothing")

    def to_batch(self, refs):
        return Result(pa.RecordBatch.from_pylist([], schema=self.schema), NO_DEAD_LETTERS)

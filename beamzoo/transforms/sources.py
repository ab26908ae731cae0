"""Sources: where a graph's records come from.

Each source gives every record an ``id``: a file's path, a manifest's
``row:N``, or an in-memory row's own ``id`` field (else ``row:N``). A source
lists references (``refs``) and turns a list of them into a record batch
(``to_batch``), so a runner can list once and spread the work.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from beamzoo.core import NO_DEAD_LETTERS, Knob, Operator, Result, dead_letters, register
from beamzoo.schemas import ID, PATH
from beamzoo.transforms.io import encodable, is_remote, iter_files, printable


class Source(Operator):
    kind = "source"
    parallel = False

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


@register("files")
class Files(Source):
    """Files matching a glob (``**`` recurses), a directory (its images) or an fsspec URL
    pattern -> ``id`` and ``path`` (both the file's path; local paths made absolute,
    so workers started elsewhere find them). A name that is not valid UTF-8 becomes
    a dead letter of step ``list``."""

    default_id = "files"
    knobs = {"pattern": Knob(None, str, doc="glob, directory or URL pattern")}

    def __init__(self, pattern: str, id: str | None = None):
        if isinstance(pattern, os.PathLike):
            pattern = os.fspath(pattern)
        if isinstance(pattern, str) and not is_remote(pattern):
            pattern = os.path.abspath(pattern.removeprefix("file://"))
        super().__init__(id, pattern=pattern)

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


@register("manifest")
class Manifest(Source):
    """A Parquet or CSV table with one input per row: its ``uri_column`` becomes
    ``path`` and its other columns pass through to the outputs; ids are ``row:N``."""

    default_id = "manifest"
    knobs = {"table": Knob(None, str, doc="the Parquet or CSV file"),
             "uri_column": Knob("uri", str, doc="the column with each input's path or URL")}

    def __init__(self, table: str, uri_column: str = "uri", id: str | None = None):
        if not is_remote(table):
            table = os.path.abspath(table)
        super().__init__(id, table=table, uri_column=uri_column)
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


@register("rows")
class Rows(Source):
    """In-memory rows (a list of dicts of JSON values), for tests and serving.
    A row's ``id`` field is its id; else it gets ``row:N``."""

    default_id = "rows"
    knobs = {"rows": Knob(None, list, doc="the rows, each a dict")}

    def __init__(self, rows: list[dict], id: str | None = None):
        super().__init__(id, rows=[dict(r) for r in rows])

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

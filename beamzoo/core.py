"""The engine-independent operator model.

An operator turns an Arrow record batch into an Arrow record batch plus a batch
of dead letters. It declares the fields it ``requires``, the fields it
``produces`` and the fields it ``consumes`` (drops). It knows nothing of Beam:
the Beam adapter and the edge runner both call ``setup`` once and ``process``
per batch.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

from beamzoo.schemas import DEAD_LETTER_SCHEMA, PATH, check_fits


@dataclass(frozen=True)
class Hints:
    """Neutral knobs; each runner reads the ones it understands.

    ``batch_size``: rows per ``process`` call. ``parallel``: whether the step
    may run in several threads at once (pure CPU work that drops the GIL).
    """

    batch_size: int = 16
    parallel: bool = True


class Result(NamedTuple):
    ok: pa.RecordBatch
    dead: pa.RecordBatch


def dead_letters(batch: pa.RecordBatch, rows: list[int], stage: str, errors: list[str]) -> pa.RecordBatch:
    """Dead letters for ``rows`` of ``batch``: their path (and key, if any), the stage, the reason."""
    taken = batch.select([n for n in ("path", "key") if n in batch.schema.names]).take(
        pa.array(rows, pa.int64()))
    key = taken.column("key") if "key" in taken.schema.names else pa.nulls(len(rows), pa.string())
    return pa.record_batch([taken.column("path"), pa.array([stage] * len(rows), pa.string()),
                            pa.array(errors, pa.string()), key], schema=DEAD_LETTER_SCHEMA)


NO_DEAD_LETTERS = pa.RecordBatch.from_pylist([], schema=DEAD_LETTER_SCHEMA)


def error_text(exc: BaseException) -> str:
    """A one-line reason for a dead letter: the exception type and message."""
    msg = str(exc).strip() or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {msg}"


class Operator:
    """Base class: subclasses set ``requires``/``produces``/``consumes``.

    ``requires`` and ``produces`` are ``pa.Schema``s; ``consumes`` names the
    required fields that are dropped from the output.
    """

    requires: pa.Schema = pa.schema([])
    produces: pa.Schema = pa.schema([])
    consumes: tuple[str, ...] = ()
    hints: Hints = Hints()

    def __init__(self, name: str | None = None, hints: Hints | None = None):
        self.name = name or type(self).__name__
        if hints is not None:
            self.hints = hints

    def setup(self) -> None:
        """Load models and other heavy state; called once per worker."""

    def process(self, batch: pa.RecordBatch) -> Result:
        raise NotImplementedError

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        fields = [f for f in input_schema if f.name not in self.consumes
                  and self.produces.get_field_index(f.name) < 0]
        return pa.schema(fields + list(self.produces))

    def fingerprint(self) -> dict[str, Any]:
        """What defines this step's results (for graph versioning)."""
        return {"op": type(self).__name__, "name": self.name}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


class RowOperator(Operator):
    """An operator defined one row at a time; a row that raises becomes a dead letter.

    Subclasses implement ``process_row(row) -> dict`` of produced values.
    """

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, batch: pa.RecordBatch) -> Result:
        keep, produced, bad, errors = [], [], [], []
        needed = [f.name for f in self.requires]
        columns = {n: batch.column(n).to_pylist() for n in {*needed, "path"}}
        for i in range(batch.num_rows):
            row = {n: c[i] for n, c in columns.items()}
            try:
                produced.append(self.process_row(row))
                keep.append(i)
            except Exception as exc:  # a bad record must not kill the run
                bad.append(i)
                errors.append(error_text(exc))
        return Result(self._assemble(batch, keep, produced), dead_letters(batch, bad, self.name, errors))

    def _assemble(self, batch: pa.RecordBatch, keep: list[int], produced: list[dict]) -> pa.RecordBatch:
        schema = self.output_schema(batch.schema)
        kept = batch.take(pa.array(keep, pa.int64())) if len(keep) != batch.num_rows else batch
        arrays = []
        for f in schema:
            if self.produces.get_field_index(f.name) >= 0:
                arrays.append(self.to_array(f, [p[f.name] for p in produced]))
            else:
                arrays.append(kept.column(f.name))
        return pa.record_batch(arrays, schema=schema)

    def to_array(self, field: pa.Field, values: list) -> pa.Array:
        """Build a produced column; override for tensors."""
        return pa.array(values, field.type)


class Source:
    """The start of a graph: produces the ``path`` column.

    A local pattern is made absolute, so that workers started elsewhere (a
    Flink cluster's Python workers) find the same files.
    """

    schema = pa.schema([PATH])

    def __init__(self, pattern: str):
        self.pattern = pattern if "://" in pattern else os.path.abspath(pattern)

    @classmethod
    def batch(cls, paths: list[str]) -> pa.RecordBatch:
        """The first batch of a graph: a ``path`` column."""
        return pa.record_batch([pa.array(paths, pa.string())], schema=cls.schema)

    def paths(self) -> list[str]:
        """The files this source reads: the matching files, as ``select`` keeps them."""
        from beamzoo.transforms.io import list_files
        return self.select(list_files(self.pattern))

    def select(self, paths: list[str]) -> list[str]:
        """Of the listed files, those whose names Arrow can hold (valid UTF-8)."""
        from beamzoo.transforms.io import split_unencodable
        return split_unencodable(paths)[0]

    def __repr__(self):
        return f"Source({self.pattern!r})"


@dataclass(frozen=True)
class Graph:
    """An immutable chain: a source, then operators, checked as it is built.

    >>> from beamzoo.transforms.io import ReadFiles
    >>> g = Graph(Source("imgs/*.jpg")) | ReadFiles()
    >>> [f.name for f in g.schema]
    ['path', 'data']
    """

    source: Source
    steps: tuple[Operator, ...] = ()
    schemas: tuple[pa.Schema, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if not self.schemas:
            schemas = [self.source.schema]
            for step in self.steps:
                schemas.append(_chain(step, schemas[-1]))
            object.__setattr__(self, "schemas", tuple(schemas))

    @property
    def schema(self) -> pa.Schema:
        """The schema of the rows the last step emits."""
        return self.schemas[-1]

    def __or__(self, step: Operator) -> Graph:
        if not isinstance(step, Operator):
            raise TypeError(f"a graph step must be a beamzoo Operator, got {step!r}")
        names = {s.name for s in self.steps}
        if step.name in names:
            raise ValueError(f"step name '{step.name}' is used twice; pass name=... to tell them apart")
        return Graph(self.source, self.steps + (step,), self.schemas + (_chain(step, self.schema),))

    def fingerprint(self) -> list[dict[str, Any]]:
        return [s.fingerprint() for s in self.steps]


def _chain(step: Operator, input_schema: pa.Schema) -> pa.Schema:
    check_fits(step.name, step.requires, input_schema)
    return step.output_schema(input_schema)

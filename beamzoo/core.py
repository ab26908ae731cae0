"""The engine-independent operator model.

An operator turns an Arrow record batch into a record batch plus a batch of
dead letters. It declares the fields it ``requires``, ``produces`` and
``consumes`` (drops), and its knobs: each with a default, a domain and
whether it changes results (only those enter a graph's fingerprint). An
operator is built from JSON parameters alone, so a graph step is data; heavy
state (an onnxruntime session) is made in ``setup`` and shared per process
(``beamzoo.resources``). Operators know nothing of Beam.

Every record carries a framework-owned ``id``; a record made by a one-to-many
step also carries its ``parent_id``. Dead letters name the record, its source
(the ``path``, when it has one), the step and the reason.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, NamedTuple

import pyarrow as pa

from beamzoo.schemas import DEAD_LETTER_SCHEMA, ID, PARENT_ID

PRIMITIVES = ("source", "map", "explode", "route", "merge", "collect", "sink")
PLACEMENT = {"tier": ("device", "edge", "cloud"), "device": ("cpu", "gpu")}  # hints a step may carry


class Result(NamedTuple):
    ok: pa.RecordBatch
    dead: pa.RecordBatch


NO_DEAD_LETTERS = pa.RecordBatch.from_pylist([], schema=DEAD_LETTER_SCHEMA)


def dead_letters(batch: pa.RecordBatch, rows: list[int], stage: str, errors: list[str]) -> pa.RecordBatch:
    """Dead letters for ``rows`` of ``batch``: id, source, stage, reason, key and parent id."""
    if not rows:
        return NO_DEAD_LETTERS
    taken = batch.take(pa.array(rows, pa.int64()))
    names = taken.schema.names

    def col(name, fallback=None):
        if name in names:
            return taken.column(name).cast(pa.string())
        return fallback if fallback is not None else pa.nulls(len(rows), pa.string())

    ids = col("id")
    return pa.record_batch([ids, col("path", ids), pa.array([stage] * len(rows), pa.string()),
                            pa.array(errors, pa.string()), col("key"), col("parent_id")],
                           schema=DEAD_LETTER_SCHEMA)


def error_text(exc: BaseException) -> str:
    """A one-line reason for a dead letter: the exception type and message (or the
    ``dead_letter_reason`` an exception carries, as is)."""
    reason = getattr(exc, "dead_letter_reason", None)
    if isinstance(reason, str):
        return reason
    msg = str(exc).strip() or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {msg}"


class KnobError(ValueError):
    """A step was given an option it does not have, or a value outside the option's domain."""


@dataclass(frozen=True)
class Knob:
    """One declared parameter of an operator.

    ``type``: int, float, str, bool, list or object (any JSON value).
    ``low``/``high`` bound numbers; ``choices`` lists the allowed values.
    ``results``: whether the knob can change the rows (it then enters the
    graph's fingerprint) or only speed (batch sizes, threads).
    """

    default: Any = None
    type: type = object
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    results: bool = True
    doc: str = ""

    def check(self, op: str, name: str, value: Any) -> Any:
        if value is None and self.default is None:
            return None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is list and isinstance(value, tuple):
            value = list(value)
        if self.type is not object and (not isinstance(value, self.type)
                                        or (self.type is int and isinstance(value, bool))):
            raise KnobError(f"{op}: {name} must be {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise KnobError(f"{op}: {name} must be one of {list(self.choices)}, got {value!r}")
        if self.low is not None and value < self.low:
            raise KnobError(f"{op}: {name} must be >= {_number(self.low)}, got {value!r}")
        if self.high is not None and value > self.high:
            raise KnobError(f"{op}: {name} must be <= {_number(self.high)}, got {value!r}")
        return value


def _number(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


OPS: dict[str, type[Operator]] = {}


def register(name: str):
    """Class decorator: make an operator known by ``name`` in graph JSON."""
    def deco(cls):
        cls.op_name = name
        OPS[name] = cls
        return cls
    return deco


def op_class(name: str) -> type[Operator]:
    import beamzoo.transforms  # noqa: F401 - registers the built-in operators
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown operator {name!r}; known: {', '.join(sorted(OPS))}") from None


class Operator:
    """Base class of every step's implementation.

    Subclasses set ``kind`` (a primitive), ``knobs`` and ``default_id``,
    call ``super().__init__(id, **params)`` and derive the rest in
    ``configure``. ``requires``/``produces`` are ``pa.Schema``s;
    ``consumes`` names required fields dropped from the output.
    """

    kind = "map"
    op_name = ""
    default_id = "step"
    knobs: dict[str, Knob] = {}
    parallel = True  # may run in several threads at once (work that drops the GIL)
    requires: pa.Schema = pa.schema([])
    produces: pa.Schema = pa.schema([])
    consumes: tuple[str, ...] = ()

    def __init__(self, id: str | None = None, **params):
        self._refuse_unknown(params)
        self.id = id or self.default_id
        self.params = {k: knob.check(type(self).__name__, k, params.get(k, knob.default))
                       for k, knob in self.knobs.items()}
        self.configure()

    def configure(self) -> None:
        """Derive schemas and settings from ``self.params``."""

    placement: dict = {}

    def placed(self, tier: str | None = None, device: str | None = None) -> Operator:
        """Hint where the step should run (``tier``: device, edge or cloud; ``device``: cpu or
        gpu). Runners that understand a hint read it, the rest ignore it; it never changes
        the rows, so it stays out of the fingerprint."""
        given = {k: v for k, v in (("tier", tier), ("device", device)) if v is not None}
        self.placement = check_placement(self.id, given)
        return self

    @classmethod
    def from_params(cls, params: dict, id: str | None = None) -> Operator:
        cls._refuse_unknown(params)  # before the constructor's own TypeError
        return cls(id=id, **params)

    @classmethod
    def _refuse_unknown(cls, params: dict) -> None:
        unknown = sorted(set(params) - set(cls.knobs))
        if unknown:
            raise KnobError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; "
                            f"its options: {', '.join(sorted(cls.knobs)) or 'none'}")

    def result_params(self) -> dict:
        """The parameters that can change results: what a fingerprint hashes."""
        return {k: v for k, v in self.params.items() if self.knobs[k].results}

    @property
    def ports(self) -> tuple[str, ...]:
        return ("out",)

    def output_schemas(self, inputs: list[pa.Schema]) -> dict[str, pa.Schema]:
        """The schema of each output port, for the schemas of the inputs."""
        (schema,) = inputs
        fields = [f for f in schema if f.name not in self.consumes
                  and self.produces.get_field_index(f.name) < 0]
        return {"out": pa.schema(fields + list(self.produces))}

    def produced(self, inputs: list[pa.Schema]) -> list[str]:
        """The names of the columns this step adds (each may not exist before it)."""
        return self.produces.names

    def setup(self) -> None:
        """Load models and other heavy state; called once per worker before ``process``."""

    def process(self, batch: pa.RecordBatch) -> Result:
        raise NotImplementedError

    def process_pieces(self, batch: pa.RecordBatch) -> Iterator[Result]:
        """``process`` in pieces, made one at a time (a step whose output could be too big
        for one batch splits it); by default one piece."""
        yield self.process(batch)

    def __rrshift__(self, label: str) -> Operator:
        """``"name" >> Op(...)`` names the step, as in Beam."""
        if not isinstance(label, str):
            return NotImplemented
        return type(self).from_params(self.params, id=label)

    def __ror__(self, left):
        """``(a, b) | Merge()`` and ``(children, parents) | Collect(...)``."""
        from beamzoo.graph import Stream, apply
        if isinstance(left, (tuple, list)) and left and all(isinstance(s, Stream) for s in left):
            return apply(self, list(left))
        return NotImplemented

    def __repr__(self):
        return f"{type(self).__name__}(id={self.id!r})"


class RowOperator(Operator):
    """An operator defined one row at a time; a row that raises becomes a dead letter.

    Subclasses implement ``process_row(row) -> dict`` of produced values.
    """

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def process_rows(self, rows: list[dict[str, Any]]) -> list:
        """Each row's ``process_row`` result, or the exception it raised."""
        out = []
        for row in rows:
            try:
                out.append(self.process_row(row))
            except Exception as exc:  # a bad record must not kill the run
                out.append(exc)
        return out

    def rows(self, batch: pa.RecordBatch) -> list[dict[str, Any]]:
        """The rows of ``batch``, the required fields of each."""
        columns = {f.name: batch.column(f.name).to_pylist() for f in self.requires}
        return [{n: c[i] for n, c in columns.items()} for i in range(batch.num_rows)]

    def process(self, batch: pa.RecordBatch) -> Result:
        return self.result(batch, self.process_rows(self.rows(batch)))

    def result(self, batch: pa.RecordBatch, outs: list) -> Result:
        """The Result of ``batch`` for ``outs``, each row's produced values or exception."""
        keep, produced, bad, errors, stages = [], [], [], [], []
        for i, out in enumerate(outs):
            if isinstance(out, Exception):
                bad.append(i)
                errors.append(error_text(out))
                stages.append(getattr(out, "stage", self.id))  # a fused step names the part that failed
            else:
                produced.append(out)
                keep.append(i)
        out = self._assemble(batch, keep, produced)
        if len(set(stages)) <= 1:
            return Result(out, dead_letters(batch, bad, stages[0] if stages else self.id, errors))
        parts = [dead_letters(batch, [i], st, [e]) for i, st, e in zip(bad, stages, errors)]
        return Result(out, pa.concat_batches(parts))

    def _assemble(self, batch: pa.RecordBatch, keep: list[int], produced: list[dict]) -> pa.RecordBatch:
        schema = self.output_schemas([batch.schema])["out"]
        kept = batch.take(pa.array(keep, pa.int64())) if len(keep) != batch.num_rows else batch
        arrays = [self.to_array(f, [p[f.name] for p in produced])
                  if self.produces.get_field_index(f.name) >= 0 else kept.column(f.name)
                  for f in schema]
        return pa.record_batch(arrays, schema=schema)

    def to_array(self, field: pa.Field, values: list) -> pa.Array:
        """Build a produced column; override for tensors."""
        return pa.array(values, field.type)


def check_placement(step: str, hints: dict) -> dict:
    for k, v in hints.items():
        if k not in PLACEMENT:
            raise KnobError(f"step {step!r}: unknown placement hint {k!r}; hints: {', '.join(PLACEMENT)}")
        if v not in PLACEMENT[k]:
            raise KnobError(f"step {step!r}: placement {k} must be one of {', '.join(PLACEMENT[k])}, got {v!r}")
    return dict(sorted(hints.items()))


def with_columns(batch: pa.RecordBatch, schema: pa.Schema, produced: dict[str, pa.Array]) -> pa.RecordBatch:
    """``batch``'s columns laid out as ``schema``, the produced ones taken from ``produced``."""
    return pa.record_batch([produced[f.name] if f.name in produced else batch.column(f.name)
                            for f in schema], schema=schema)


__all__ = ["ID", "PARENT_ID", "PLACEMENT", "Knob", "KnobError", "NO_DEAD_LETTERS", "OPS", "Operator", "PRIMITIVES", "Result",
           "RowOperator", "check_placement", "dead_letters", "error_text", "op_class", "register", "with_columns"]

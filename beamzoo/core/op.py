"""The engine-independent operator: a spec (knobs, schemas, traits) and a kernel.

An operator turns an Arrow record batch into a record batch plus a batch of
dead letters. Its **spec** is data: its knobs (``beamzoo.core.knobs``), from
which its constructor and its JSON parameters are derived; the fields it
``requires``, ``produces`` and ``consumes`` (drops); and its **traits**, which
generic code (the compiler, the executors, resume, serving, bundles) asks
instead of recognising an op by its name:

- ``kind``: its primitive (``source``, ``map``, ``explode``, ``route``, ``merge``,
  ``collect``, ``sink``), hence its cardinality (``cardinality``);
- ``parallel``: row-parallel (several threads may run it at once);
- ``drops_rows``: it may drop a row without a dead letter (what a resume skips);
- ``fuse(reader)``: the rewrite rule it registers with the step that reads it;
- ``model_knobs()``: the knobs that name model cards (bundles, serving);
- ``loads_input``: it turns an input's reference into its content (resume keys
  rows after it; serving answers requests in its place);
- ``stops_run()``: it may ask the run to read no more inputs;
- sources: ``input_knob`` (what a bundle's ``--input`` fills in), ``check_inputs()``;
- sinks: ``format`` (``parquet``, ``jsonl``, ``memory``), ``resumable`` (its rows
  carry resume keys and can be read back), ``path``.

Its **kernel** is bound at run time (``bind``): heavy state (an onnxruntime
session) comes from the run context's resources, made once per process and
shared by its threads (``beamzoo.core.resources``).

Every record carries a framework-owned ``id``; a record made by a one-to-many
step also carries its ``parent_id``. Dead letters name the record, its source
(the ``path``, when it has one), the step and the reason.
"""
from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any, NamedTuple

import pyarrow as pa

from beamzoo.core.context import STANDALONE, RunContext
from beamzoo.core.knobs import Knob, KnobError, bind, checked, declare
from beamzoo.core.schemas import DEAD_LETTER_SCHEMA

PRIMITIVES = ("source", "map", "explode", "route", "merge", "collect", "sink")
CARDINALITY = {"source": "0:n", "map": "1:1", "explode": "1:n", "route": "1:1", "merge": "n:1 (streams)",
               "collect": "n:1", "sink": "1:0"}
PLACEMENT = {"tier": ("device", "edge", "cloud"), "device": ("cpu", "gpu")}  # hints a step may carry


# What a step that can split its output hands on in one batch at most (a binary Arrow array ends at 2 GiB).
PIECE_BYTES = 256 << 20


class Result(NamedTuple):
    ok: Any  # a record batch, or {port: record batch} for a step with several ports
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


def check_placement(step: str, hints: dict) -> dict:
    for k, v in hints.items():
        if k not in PLACEMENT:
            raise KnobError(f"step {step!r}: unknown placement hint {k!r}; hints: {', '.join(PLACEMENT)}")
        if v not in PLACEMENT[k]:
            raise KnobError(f"step {step!r}: placement {k} must be one of {', '.join(PLACEMENT[k])}, got {v!r}")
    return dict(sorted(hints.items()))


class Operator:
    """Base class of every step.

    Subclasses set ``name`` (what graph JSON calls it), ``kind``, ``default_id``,
    ``knobs`` (and ``positional``: the knobs that may be given by position); the
    constructor comes from them. ``configure`` derives schemas and settings from
    ``self.params``; ``setup`` loads heavy state when the kernel is bound.
    """

    name = ""
    kind = "map"
    default_id = "step"
    knobs: dict[str, Knob] = {}
    positional: tuple[str, ...] = ()
    parallel = True  # row-parallel: may run in several threads at once (work that drops the GIL)
    drops_rows = False  # may drop rows without a dead letter (a resume's skips)
    loads_input = False  # turns an input's reference into its content
    requires: pa.Schema = pa.schema([])
    produces: pa.Schema = pa.schema([])
    consumes: tuple[str, ...] = ()
    ctx: RunContext = STANDALONE

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        declare(cls)

    def __init__(self, *args, id: str | None = None, **params):
        self._start(bind(type(self).__name__, self.knobs, self.positional, args, params), id)

    def _start(self, params: dict, id: str | None) -> None:
        self.params = params
        self.id = id or self.default_id
        self.named = id is not None
        self.placement: dict = {}
        self._bound = False
        self.configure()

    @classmethod
    def from_params(cls, params: dict, id: str | None = None) -> Operator:
        """The operator of a step's JSON parameters (checked, never converted again)."""
        op = cls.__new__(cls)
        op._start(checked(cls.__name__, cls.knobs, params), id)
        return op

    def configure(self) -> None:
        """Derive schemas and settings from ``self.params``."""

    # ---------------------------------------------------------------- traits
    @property
    def cardinality(self) -> str:
        return CARDINALITY[self.kind]

    @classmethod
    def model_knobs(cls) -> list[str]:
        """The knobs whose values name model cards."""
        return [n for n, k in cls.knobs.items() if k.role == "model"]

    def fuse(self, reader: Operator) -> Operator | None:
        """One step doing this step's work and that of ``reader`` (its only reader, a map of the
        same placement), with the same rows out; None where there is none."""
        return None

    def stops_run(self) -> bool:
        """Whether the step may ask its run to read no more inputs (a gate's ``stop``)."""
        return False

    def one_process(self) -> bool:
        """Whether the step needs the whole run in one long-lived process (it keeps state across
        batches that a Beam runner's workers would not share)."""
        return False

    def placed(self, tier: str | None = None, device: str | None = None) -> Operator:
        """Hint where the step should run (``tier``: device, edge or cloud; ``device``: cpu or
        gpu). Executors that understand a hint read it, the rest ignore it; it never changes
        the rows, so it stays out of the fingerprint."""
        given = {k: v for k, v in (("tier", tier), ("device", device)) if v is not None}
        self.placement = check_placement(self.id, given)
        return self

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

    # ---------------------------------------------------------------- kernel
    def bind(self, ctx: RunContext | None = None) -> Operator:
        """Ready the kernel for a run (``ctx``: its context): ``setup`` once."""
        if ctx is not None:
            self.ctx = ctx
        if not self._bound:
            self._bound = True
            self.setup()
        return self

    def setup(self) -> None:
        """Load models and other heavy state (``self.ctx.shared``); once per bound operator."""

    def process(self, batch: pa.RecordBatch) -> Result:
        raise NotImplementedError

    def process_pieces(self, batch: pa.RecordBatch) -> Iterator[Result]:
        """``process`` in pieces, made one at a time (a step whose output could be too big
        for one batch splits it); by default one piece."""
        yield self.process(batch)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("ctx", None)  # a kernel is bound again where it runs
        state["_bound"] = False
        return state

    # ---------------------------------------------------------------- building graphs
    def __rrshift__(self, label: str) -> Operator:
        """``"name" >> Op(...)`` names the step, as in Beam."""
        if not isinstance(label, str):
            return NotImplemented
        op = type(self).from_params(self.params, id=label)
        op.placement = dict(self.placement)
        return op

    def __ror__(self, left):
        """``(a, b) | Merge()`` and ``(children, parents) | Collect(...)``."""
        if isinstance(left, (tuple, list)) and left and all(getattr(s, "is_stream", False) for s in left):
            return left[0].join(self, list(left))  # streams of a graph (beamzoo.core.graph.Stream)
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
        self.bind()
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


def with_columns(batch: pa.RecordBatch, schema: pa.Schema, produced: dict[str, pa.Array]) -> pa.RecordBatch:
    """``batch``'s columns laid out as ``schema``, the produced ones taken from ``produced``."""
    return pa.record_batch([produced[f.name] if f.name in produced else batch.column(f.name)
                            for f in schema], schema=schema)


__all__ = ["CARDINALITY", "NO_DEAD_LETTERS", "Operator", "PIECE_BYTES", "PLACEMENT", "PRIMITIVES", "Result",
           "RowOperator", "check_placement", "dead_letters", "error_text", "with_columns"]

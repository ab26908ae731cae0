"""beamzoo's operators as Beam PTransforms, for users' own Beam pipelines.

    import apache_beam as beam
    from beamzoo import beam as bz

    preds = paths | bz.Classify("efficientnet_lite0", topk=5)   # paths: PCollection[str]
    preds | beam.Select("path", "label", "score")                 # schema'd rows
    bz.dead_letters(preds) | ...                                   # id, source, stage, error

A transform takes a PCollection of path strings, ``fileio`` matches
(``FileMetadata`` or ``ReadableFile``), or schema'd rows (``beam.Row``, dicts
with a ``path``), and returns schema'd rows whose Beam schema is derived from
the Arrow schema: every column but tensors and decoded images, which stay
inside beamzoo (chained beamzoo transforms hand each other Arrow batches).
Each wraps a beamzoo graph with one open input, compiled and translated as
beamzoo's own pipelines are on Beam runners, so schemas are checked while the
pipeline is built: a missing preprocessing step raises ``SchemaMismatchError`` at once.
Each also declares its Beam type hints (``INPUT_TYPE`` in, ``beam.Row`` out), so
that Beam's pipeline type check refuses a PCollection of anything else (ints,
say) with a ``TypeCheckError`` naming the transform, when it is applied.
"""
from __future__ import annotations

import re
import typing
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam import pvalue, typehints
from apache_beam.io import fileio
from apache_beam.typehints.decorators import IOTypeHints, TypeCheckError
from apache_beam.typehints.row_type import RowTypeConstraint
from apache_beam.typehints.typehints import is_consistent_with

from beamzoo.classify import Classify as ClassifyGraph
from beamzoo.core.graph import GraphBuilder, Stream
from beamzoo.core.schemas import DEAD_LETTER_SCHEMA, ID, IMAGE_STRUCT, PATH, TensorSpec
from beamzoo.runners.beam import flatten, translate
from beamzoo.transforms import flow, inference, io, postprocess, preprocess
from beamzoo.transforms.sources import Input

# ---------------------------------------------------------------- schemas

_SCALARS = [(pa.types.is_string, str), (pa.types.is_large_string, str), (pa.types.is_boolean, bool),
            (pa.types.is_integer, int), (pa.types.is_floating, float), (pa.types.is_binary, bytes),
            (pa.types.is_large_binary, bytes)]


def _python_type(t: pa.DataType):
    for test, py in _SCALARS:
        if test(t):
            return py
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _python_type(t.value_type)
        return typing.Sequence[inner] if inner is not None else None
    return None


def _shown(f: pa.Field) -> bool:
    return (TensorSpec.from_field(f) is None and not f.type.equals(IMAGE_STRUCT)
            and not isinstance(f.type, pa.ExtensionType) and _python_type(f.type) is not None)


def row_type(schema: pa.Schema) -> RowTypeConstraint:
    """The Beam schema of the rows a user sees for an Arrow schema."""
    fields = []
    for f in schema:
        if _shown(f):
            py = _python_type(f.type)
            fields.append((f.name, typing.Optional[py] if f.nullable else py))
    return RowTypeConstraint.from_fields(fields)


class _ToRows(beam.DoFn):
    def __init__(self, schema: pa.Schema):
        self.names = [f.name for f in schema if _shown(f)]

    def process(self, batch):
        for row in batch.select(self.names).to_pylist():
            yield beam.Row(**row)


def _arrow_type(py) -> pa.DataType | None:
    origin = typing.get_origin(py)
    if origin is typing.Union:
        args = [a for a in typing.get_args(py) if a is not type(None)]
        return _arrow_type(args[0]) if len(args) == 1 else None
    if origin in (list, typing.List, typing.Sequence, typing.Iterable) or str(origin).endswith("Sequence'>"):
        inner = _arrow_type(typing.get_args(py)[0])
        return pa.list_(inner) if inner is not None else None
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
            bytes: pa.binary()}.get(py)


# ---------------------------------------------------------------- type hints

INPUT_TYPE = typehints.Union[str, beam.io.filesystem.FileMetadata, fileio.ReadableFile, beam.Row,
                             typehints.Dict[str, typehints.Any]]
TAKES = ("path strings, fileio matches (FileMetadata, ReadableFile) or rows with a 'path' field "
         "(beam.Row, a NamedTuple or dataclass, a dict)")


def _as_row(element_type):
    """A NamedTuple or dataclass element type as the schema'd row type Beam makes of it."""
    row = RowTypeConstraint.from_user_type(element_type) if isinstance(element_type, type) else None
    if row is None:
        return element_type
    try:  # annotations written as strings (``from __future__ import annotations``)
        hints = typing.get_type_hints(element_type)
    except NameError:
        return row
    return RowTypeConstraint.from_fields([(name, hints.get(name, t)) for name, t in row._fields])


def _shown_type(t) -> str:
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", str(t))


def _input_schema(element_type) -> pa.Schema:
    """The Arrow schema of the batches a user's PCollection becomes."""
    element_type = _as_row(element_type)
    fields = [ID, PATH]
    if isinstance(element_type, RowTypeConstraint):
        names = [n for n, _ in element_type._fields]
        if "path" not in names:
            raise TypeError(f"beamzoo reads rows that have a 'path' field; these have {names}")
        for name, py in element_type._fields:
            t = _arrow_type(py)
            if name not in ("id", "path") and t is not None:
                fields.append(pa.field(name, t))
    return pa.schema(fields)


def _to_dict(element) -> dict:
    if isinstance(element, str):
        return {"path": element}
    if hasattr(element, "metadata") and hasattr(element.metadata, "path"):  # fileio.ReadableFile
        return {"path": element.metadata.path}
    if hasattr(element, "path") and hasattr(element, "size_in_bytes"):  # fileio.FileMetadata
        return {"path": element.path}
    if isinstance(element, dict):
        return dict(element)
    if hasattr(element, "_asdict"):
        return dict(element._asdict())
    if hasattr(element, "__dict__"):
        return dict(vars(element))
    raise TypeError(f"beamzoo takes path strings, fileio matches or rows, got {type(element).__name__}")


class _ToBatch(beam.DoFn):
    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def process(self, elements):
        rows = []
        for e in elements:
            d = _to_dict(e)
            d.setdefault("id", d.get("path") or f"row:{uuid.uuid4().hex}")
            rows.append({f.name: d.get(f.name) for f in self.schema})
        yield pa.RecordBatch.from_pylist(rows, schema=self.schema)


class _Lineage:
    """What a beamzoo output carries for the next beamzoo transform."""

    def __init__(self, batches, schema: pa.Schema, dead: list):
        self.batches, self.schema, self.dead = batches, schema, dead


class Apply(beam.PTransform):
    """Any beamzoo operators or composites, in order, as one Beam transform."""

    def __init__(self, *parts, label: str | None = None):
        super().__init__(label)
        if not parts:
            raise TypeError("Apply needs at least one beamzoo operator")
        self.parts = parts

    def default_label(self):
        return "+".join(type(p).__name__ for p in self.parts)

    def default_type_hints(self):
        return IOTypeHints.empty().with_input_types(INPUT_TYPE).with_output_types(beam.Row)

    def _name(self) -> str:
        name = f"beamzoo.beam.{type(self).__name__}"
        return f"{name}({self.default_label()})" if type(self) is Apply else name

    def type_check_inputs(self, pvalueish):
        """Beam's check when the transform is applied, in beamzoo's words."""
        if not isinstance(pvalueish, pvalue.PCollection):
            raise TypeCheckError(f"{self._name()} takes a PCollection of {TAKES}, not {type(pvalueish).__name__}")
        hints = self.get_type_hints().input_types
        hint, got = hints[0][0] if hints and hints[0] else None, _as_row(pvalueish.element_type)
        if hint is None or got is None:
            return
        if not is_consistent_with(got, hint):
            expected = _shown_type(hint)
        elif (isinstance(got, RowTypeConstraint) and getattr(pvalueish, "_beamzoo", None) is None
              and "path" not in [n for n, _ in got._fields]):
            expected = "rows that have a 'path' field"
        else:
            return
        takes = f"takes {TAKES}; " if hint == INPUT_TYPE else ""
        where = f" (from {pvalueish.producer.full_label!r})" if pvalueish.producer else ""
        raise TypeCheckError(f"Input type hint violation at {self.label}: {self._name()} {takes}"
                             f"expected {expected}, got {_shown_type(got)}{where}")

    def expand(self, pcoll):
        lineage = getattr(pcoll, "_beamzoo", None)
        if lineage is None:
            schema = _input_schema(pcoll.element_type)
            batches = (pcoll
                       | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=16)
                       | "ToArrow" >> beam.ParDo(_ToBatch(schema)))
            lineage = _Lineage(batches, schema, [])
        stream = GraphBuilder() | Input(lineage.schema)
        for part in self.parts:
            stream = stream | part
        if not isinstance(stream, Stream):
            raise TypeError("a beamzoo Beam transform must end in one output (not a route's branches)")
        t = translate(stream.graph, pcoll.pipeline, inputs={"input": lineage.batches})
        out = t.ports[t.plan.stage_port(stream.ref)]
        schema = stream.schema
        dead = t.dead_letters() | "DeadRows" >> beam.ParDo(_ToRows(DEAD_LETTER_SCHEMA)).with_output_types(
            row_type(DEAD_LETTER_SCHEMA))
        rows = out | "Rows" >> beam.ParDo(_ToRows(schema)).with_output_types(row_type(schema))
        rows._beamzoo = _Lineage(out, schema, [*lineage.dead, dead])
        return rows


def dead_letters(pcoll) -> beam.PCollection:
    """Every dead letter of the beamzoo transforms that made ``pcoll``, as schema'd rows
    (``id``, ``source``, ``stage``, ``error``, ``key``, ``parent_id``)."""
    lineage = getattr(pcoll, "_beamzoo", None)
    if lineage is None:
        raise TypeError("dead_letters() takes the output of a beamzoo transform")
    return flatten(lineage.dead, f"DeadLetters{len(lineage.dead)}-{uuid.uuid4().hex[:6]}")


def _wrap(cls):
    """A PTransform class taking the same arguments as the beamzoo operator or composite ``cls``."""
    def __init__(self, *args, label: str | None = None, **kw):
        Apply.__init__(self, cls(*args, **kw), label=label)
    return type(cls.__name__, (Apply,), {"__init__": __init__, "__doc__": cls.__doc__,
                                          "__module__": __name__, "__signature__": getattr(cls, "__signature__", None)})


ReadFiles = _wrap(io.ReadFiles)
DecodeImage = _wrap(preprocess.DecodeImage)
ResizeCrop = _wrap(preprocess.ResizeCrop)
DecodeResize = _wrap(preprocess.DecodeResize)
OnnxInference = _wrap(inference.OnnxInference)
TopK = _wrap(postprocess.TopK)
Drop = _wrap(flow.Drop)


Classify = _wrap(ClassifyGraph)
Classify.__doc__ = """paths -> predictions: read, decode and resize for the model, infer, top-k
(``beamzoo.Classify`` as one Beam transform)."""


__all__ = ["Apply", "Classify", "DecodeImage", "DecodeResize", "Drop", "INPUT_TYPE", "OnnxInference", "ReadFiles",
           "ResizeCrop", "TopK", "dead_letters", "row_type"]

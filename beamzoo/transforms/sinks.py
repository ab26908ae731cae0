"""Sinks: where a graph's rows go. A sink names a folder (Parquet) or a file
prefix (JSON lines); each runner writes it with its own means (the edge runner
with ``beamzoo.runners.sinks``, Beam with its file IOs), files complete or not
at all.
"""
from __future__ import annotations

import os

import pyarrow as pa

from beamzoo.core import Knob, Operator, register
from beamzoo.schemas import IMAGE_STRUCT, TensorSpec
from beamzoo.transforms.io import is_remote


def is_raw(field: pa.Field) -> bool:
    """Whether a column holds an input's raw bytes or pixels."""
    return (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
            or field.type.equals(IMAGE_STRUCT) or TensorSpec.from_field(field) is not None
            or isinstance(field.type, pa.ExtensionType))


class Sink(Operator):
    kind = "sink"
    parallel = False
    knobs = {"path": Knob(None, str),
             "derived_only": Knob(False, bool, doc="drop raw bytes, images and tensors before writing")}

    def __init__(self, path: str, derived_only: bool = False, id: str | None = None):
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if isinstance(path, str) and not is_remote(path):
            path = os.path.abspath(path)
        super().__init__(id, path=path, derived_only=derived_only)

    @property
    def ports(self):
        return ()

    def output_schemas(self, inputs):
        return {}

    def file_schema(self, schema: pa.Schema) -> pa.Schema:
        """What is written: all columns, or with ``derived_only`` only what was derived."""
        if not self.params["derived_only"]:
            return schema
        return pa.schema([f for f in schema if not is_raw(f)])


@register("parquet")
class WriteParquet(Sink):
    """Rows -> ``PATH/part-<run>-*.parquet`` (a folder ``pd.read_parquet(PATH)`` reads)."""

    default_id = "write"


@register("jsonl")
class WriteJsonl(Sink):
    """Rows -> ``PATH-<run>-*.jsonl``, one JSON object a line (tensors left out)."""

    default_id = "write_jsonl"

    def file_schema(self, schema):
        return pa.schema([f for f in super().file_schema(schema) if not is_raw(f)])

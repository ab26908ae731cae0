"""Sinks: where a graph's rows go. A sink declares its ``format``; each executor writes
that format with its own means (the edge runner with ``beamzoo.runners.sinks``, Beam
with its file IOs), files complete or not at all. File sinks name a folder (Parquet)
or a file prefix (JSON lines); ``resumable``: its rows carry resume keys and can be
read back, so a resumed run skips what it holds.
"""
from __future__ import annotations

import os

import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.op import Operator
from beamzoo.core.schemas import IMAGE_STRUCT, TensorSpec
from beamzoo.transforms.io import is_remote


def is_raw(field: pa.Field) -> bool:
    """Whether a column holds an input's raw bytes or pixels."""
    return (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
            or field.type.equals(IMAGE_STRUCT) or TensorSpec.from_field(field) is not None
            or isinstance(field.type, pa.ExtensionType))


def _local(path):
    path = os.fspath(path)
    return path if not isinstance(path, str) or is_remote(path) else os.path.abspath(path)


DERIVED_ONLY = Knob(False, bool, doc="write only derived columns: no raw bytes, images or tensors of an input")


class Sink(Operator):
    """A step rows end in: no output port."""

    kind = "sink"
    parallel = False
    format = ""  # what an executor writes: parquet, jsonl or memory
    resumable = False

    @property
    def ports(self):
        return ()

    def output_schemas(self, inputs):
        return {}

    def file_schema(self, schema: pa.Schema) -> pa.Schema:
        """What is written of rows of ``schema``."""
        return schema


class FileSink(Sink):
    """A sink that writes files at ``path``."""

    knobs = {"path": Knob(None, str, convert=_local, required=True, doc="where the rows go"),
             "derived_only": DERIVED_ONLY}
    positional = ("path",)

    @property
    def path(self) -> str:
        return self.params["path"]

    def file_schema(self, schema: pa.Schema) -> pa.Schema:
        """All columns, or with ``derived_only`` only what was derived."""
        if not self.params["derived_only"]:
            return schema
        return pa.schema([f for f in schema if not is_raw(f)])


class WriteParquet(FileSink):
    """Rows -> ``PATH/part-<run>-*.parquet`` (a folder ``pd.read_parquet(PATH)`` reads)."""

    name = "parquet"
    default_id = "write"
    format = "parquet"
    resumable = True


class WriteJsonl(FileSink):
    """Rows -> ``PATH-<run>-*.jsonl``, one JSON object a line (tensors left out)."""

    name = "jsonl"
    default_id = "write_jsonl"
    format = "jsonl"

    def file_schema(self, schema):
        return pa.schema([f for f in super().file_schema(schema) if not is_raw(f)])


__all__ = ["DERIVED_ONLY", "FileSink", "Sink", "WriteJsonl", "WriteParquet", "is_raw"]

"""The ends of a graph that answers requests: a source of request instances and a sink
that hands its rows back to whoever runs the graph (``format = "memory"``)."""
from __future__ import annotations

import pyarrow as pa

from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result
from beamzoo.core.schemas import ID, PATH
from beamzoo.transforms.sinks import Sink

DATA = pa.field("data", pa.binary())
REQUEST_SCHEMA = pa.schema([ID, PATH, DATA])


class Requests(Operator):
    """The instances of requests: ``id``, ``path`` (the instance's name) and ``data`` (its bytes),
    handed to the executor batch by batch."""

    name = "requests"
    kind = "source"
    parallel = False
    external = True
    input_knob = None
    default_id = "requests"

    def output_schemas(self, inputs):
        return {"out": REQUEST_SCHEMA}

    def check_inputs(self):
        pass

    def to_batch(self, refs):
        return Result(pa.RecordBatch.from_pylist([], schema=REQUEST_SCHEMA), NO_DEAD_LETTERS)


class Responses(Sink):
    """The rows that answer: kept in memory and handed back by the executor."""

    name = "responses"
    format = "memory"
    default_id = "responses"


__all__ = ["DATA", "REQUEST_SCHEMA", "Requests", "Responses"]

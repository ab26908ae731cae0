"""Parquet output for the edge runner: complete files or none.

Rows go to a hidden temporary file that is renamed to its final name only
when the run ends well; a failed run removes it.
"""
from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq


def shard_name(prefix: str, shard: int = 0, shards: int = 1) -> str:
    """The same naming Beam's file sinks use: ``prefix-00000-of-00001.parquet``."""
    return f"{prefix}-{shard:05d}-of-{shards:05d}.parquet"


class ParquetSink:
    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        self.schema = schema
        self.final = os.path.join(directory, shard_name(prefix))
        self.tmp = os.path.join(directory, f".{prefix}-{uuid.uuid4().hex}.tmp")
        self.rows = 0
        self._writer = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.final) or ".", exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, self.schema)
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def __exit__(self, exc_type, exc, tb):
        self._writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.final)
        else:
            os.unlink(self.tmp)
        return False

"""Parquet output for the edge runner: complete files or none.

Rows go to a hidden temporary file, renamed to its final name when it holds
``rows_per_file`` rows, when it is ``seconds_per_file`` old, or when the run
ends well. A killed run leaves only complete files behind (and a hidden
temporary one that a resumed run removes); a failed run removes its own.
Rows are held until ``row_group_rows`` of them make one Parquet row group:
the runner hands over a few rows at a time, and a row group per hand-over
would make files twice the size and several times slower to read.
"""
from __future__ import annotations

import glob
import os
import shutil
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetSink:
    """Writes ``directory/prefix-<run>-<seq>.parquet`` files."""

    def __init__(self, directory: str, prefix: str, schema: pa.Schema, run: str,
                 rows_per_file: int = 10_000, seconds_per_file: float = 60.0,
                 row_group_rows: int = 4096):
        self.directory, self.prefix, self.schema, self.run = directory, prefix, schema, run
        self.rows_per_file, self.seconds_per_file = rows_per_file, seconds_per_file
        self.row_group_rows = row_group_rows
        self.rows = 0  # committed and pending, this run
        self.committed: list[str] = []
        self._writer = self._tmp = None
        self._opened = self._pending = 0
        self._held: list[pa.RecordBatch] = []
        self._held_rows = 0

    def __enter__(self):
        os.makedirs(self.directory, exist_ok=True)
        return self

    def _open(self):
        self._tmp = os.path.join(self.directory, f".{self.prefix}-{uuid.uuid4().hex}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self._opened, self._pending = time.monotonic(), 0

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._writer is None:
            self._open()
        self._held.append(batch)
        self._held_rows += batch.num_rows
        if self._held_rows >= self.row_group_rows:
            self._flush()
        self.rows += batch.num_rows
        self._pending += batch.num_rows
        if (self._pending >= self.rows_per_file
                or time.monotonic() - self._opened >= self.seconds_per_file):
            self.commit()

    def _flush(self) -> None:
        if self._held:
            self._writer.write_table(pa.Table.from_batches(self._held, self.schema))
            self._held, self._held_rows = [], 0

    def commit(self) -> None:
        if self._writer is None:
            self._open()  # an empty file, so the output always has a readable schema
        self._flush()
        self._writer.close()
        final = os.path.join(self.directory, f"{self.prefix}-{self.run}-{len(self.committed):05d}.parquet")
        os.replace(self._tmp, final)
        self.committed.append(final)
        self._writer = self._tmp = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self._writer is not None:
                self._writer.close()
                os.unlink(self._tmp)
            return False
        existing = glob.glob(os.path.join(self.directory, f"{self.prefix}-*.parquet"))
        if self._writer is not None or not existing:
            self.commit()
        return False


def remove_stale_temporaries(directory: str) -> int:
    """Delete what a killed run left behind: our hidden temporary files and
    Beam's ``beam-temp-*`` folders. Returns how many were removed."""
    stale = glob.glob(os.path.join(directory, ".*.tmp")) + glob.glob(os.path.join(directory, "beam-temp-*"))
    for f in stale:
        if os.path.isdir(f):
            shutil.rmtree(f)
        else:
            os.unlink(f)
    return len(stale)


def count_rows(directory: str, prefix: str) -> int:
    """Rows in the committed ``prefix-*.parquet`` files (from their footers)."""
    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in glob.glob(os.path.join(directory, f"{prefix}-*.parquet")))

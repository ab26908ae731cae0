"""File output for the edge runner: complete files or none.

Rows go to a hidden temporary file, renamed to its final name when it holds
``rows_per_file`` rows, when it is ``seconds_per_file`` old, or when the run
ends well. A killed run leaves only complete files behind (and a hidden
temporary one that a resumed run removes); a failed run removes its own.
Parquet rows are held until ``row_group_rows`` of them make one row group:
the runner hands over a few rows at a time, and a row group per hand-over
would make files twice the size and several times slower to read.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".beamzoo-"  # every temporary file of ours starts so; nothing else is ever removed


class FileSink:
    """Writes ``<base>-<run>-<seq><suffix>`` files through hidden temporaries."""

    suffix = ""

    def __init__(self, base: str, schema: pa.Schema, run: str, rows_per_file: int = 10_000,
                 seconds_per_file: float = 60.0):
        self.base, self.schema, self.run = base, schema, run
        self.directory = os.path.dirname(base)
        self.rows_per_file, self.seconds_per_file = rows_per_file, seconds_per_file
        self.rows = 0  # committed and pending, this run
        self.committed: list[str] = []
        self._tmp = None
        self._opened = self._pending = 0

    def __enter__(self):
        os.makedirs(self.directory, exist_ok=True)
        return self

    def _open(self):
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{uuid.uuid4().hex}.tmp")
        self.open_file(tmp)  # only an opened file is ours to close
        self._tmp, self._opened, self._pending = tmp, time.monotonic(), 0

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._tmp is None:
            self._open()
        batch = batch.select(self.schema.names) if batch.schema.names != self.schema.names else batch
        self.write_batch(batch)
        self.rows += batch.num_rows
        self._pending += batch.num_rows
        if (self._pending >= self.rows_per_file
                or time.monotonic() - self._opened >= self.seconds_per_file):
            self.commit()

    def commit(self) -> None:
        if self._tmp is None:
            self._open()  # an empty file, so the output always has a readable schema
        self.close_file()
        final = f"{self.base}-{self.run}-{len(self.committed):05d}{self.suffix}"
        os.replace(self._tmp, final)
        self.committed.append(final)
        self._tmp = None

    def discard(self) -> None:
        if self._tmp is not None:
            self.close_file()
            with contextlib.suppress(FileNotFoundError):  # its folder may be gone
                os.unlink(self._tmp)
            self._tmp = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
            return False
        existing = glob.glob(glob.escape(self.base) + f"-*{self.suffix}")
        if self._tmp is not None or not existing:
            self.commit()
        return False

    def open_file(self, path: str) -> None:
        raise NotImplementedError

    def write_batch(self, batch: pa.RecordBatch) -> None:
        raise NotImplementedError

    def close_file(self) -> None:
        raise NotImplementedError


class ParquetSink(FileSink):
    """``directory/part-<run>-<seq>.parquet``."""

    suffix = ".parquet"

    def __init__(self, directory: str, schema: pa.Schema, run: str, row_group_rows: int = 4096, **kw):
        super().__init__(os.path.join(directory, "part"), schema, run, **kw)
        self.row_group_rows = row_group_rows
        self._held: list[pa.RecordBatch] = []
        self._held_rows = 0
        self._writer = None

    def open_file(self, path):
        self._writer = pq.ParquetWriter(path, self.schema)

    def write_batch(self, batch):
        self._held.append(batch)
        self._held_rows += batch.num_rows
        if self._held_rows >= self.row_group_rows:
            self._flush()

    def _flush(self):
        if self._held:
            self._writer.write_table(pa.Table.from_batches(self._held, self.schema))
            self._held, self._held_rows = [], 0

    def close_file(self):
        self._flush()
        self._writer.close()
        self._writer = None

    def discard(self):
        self._held, self._held_rows = [], 0
        super().discard()


class JsonlSink(FileSink):
    """``<prefix>-<run>-<seq>.jsonl``: one JSON object a line."""

    suffix = ".jsonl"

    def open_file(self, path):
        self._file = open(path, "w", encoding="utf-8")

    def write_batch(self, batch):
        for row in batch.to_pylist():
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close_file(self):
        self._file.close()


WRITERS = {"parquet": ParquetSink, "jsonl": JsonlSink}  # a sink's format -> its writer here


def remove_stale_temporaries(directory: str) -> int:
    """Delete what a killed run left behind: beamzoo's hidden temporary files and
    Beam's ``beam-temp-*`` folders, nothing else. Returns how many were removed."""
    if not os.path.isdir(directory):
        return 0
    d = glob.escape(directory)
    stale = glob.glob(os.path.join(d, f"{TMP_PREFIX}*.tmp")) + glob.glob(os.path.join(d, "beam-temp-*"))
    for f in stale:
        if os.path.isdir(f) and not os.path.islink(f):
            shutil.rmtree(f)
        else:
            os.unlink(f)
    return len(stale)


def count_rows(directory: str) -> int:
    """Rows in the committed Parquet files of a folder (from their footers)."""
    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in glob.glob(os.path.join(glob.escape(directory), "*.parquet")))

"""The edge runner: one process, no Beam.

Steps whose hints say ``parallel`` (read, decode, resize) run on small chunks
in a thread pool; the rest (inference, top-k) run in the calling thread on
batches of their own size. At most ``queue_depth`` chunks are in flight, so
memory stays bounded however many files there are.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from beamzoo.core import NO_DEAD_LETTERS, Graph, Operator, Source
from beamzoo.resume import run_id
from beamzoo.runners.sinks import ParquetSink
from beamzoo.schemas import DEAD_LETTER_SCHEMA


@dataclass
class RunStats:
    inputs: int
    scored: int
    failed: int
    seconds: float
    first_result_s: float | None = None

    def line(self) -> str:
        return f"inputs: {self.inputs}  scored: {self.scored}  dead letters: {self.failed}"


class EdgeRunner:
    """Runs a Graph in this process and writes Parquet.

    ``workers``: threads for the parallel steps (default: CPU count).
    ``chunk_size``: rows per parallel task. ``queue_depth``: chunks in flight.
    ``rows_per_file``/``seconds_per_file``: how often output files are committed
    (what a killed run keeps).
    """

    def __init__(self, workers: int | None = None, chunk_size: int = 16,
                 queue_depth: int | None = None, progress: bool = True,
                 rows_per_file: int = 10_000, seconds_per_file: float = 60.0):
        self.workers = workers or os.cpu_count() or 1
        self.chunk_size = chunk_size
        self.queue_depth = queue_depth or 4 * self.workers
        self.progress = progress
        self.rows_per_file, self.seconds_per_file = rows_per_file, seconds_per_file

    def run(self, graph: Graph, output: str, paths: list[str] | None = None,
            run: str | None = None) -> RunStats:
        paths = graph.source.paths() if paths is None else paths
        run = run or run_id()
        commit = dict(run=run, rows_per_file=self.rows_per_file, seconds_per_file=self.seconds_per_file)
        split = next((i for i, s in enumerate(graph.steps) if not s.hints.parallel), len(graph.steps))
        head, tail = graph.steps[:split], graph.steps[split:]
        start = time.perf_counter()  # the clock includes setup (loading the model)
        for step in graph.steps:
            step.setup()
        first = None
        with ParquetSink(output, "predictions", graph.schema, **commit) as out, \
                ParquetSink(output, "dead_letter", DEAD_LETTER_SCHEMA, **commit) as dead, \
                _progress(len(paths), self.progress) as bar, \
                ThreadPoolExecutor(self.workers, thread_name_prefix="beamzoo") as pool:

            def finish(rows: pa.RecordBatch, dl: pa.RecordBatch):
                nonlocal first
                if rows.num_rows:
                    out.write(rows)
                    first = first or time.perf_counter() - start
                dead.write(dl)
                bar.update(rows.num_rows + dl.num_rows)

            def drain(n_in: int, future):
                rows, dl = future.result()
                dead.write(dl)
                bar.update(n_in - rows.num_rows)  # dead letters and rows skipped on resume
                buffer.add(rows)
                while buffer.full():
                    finish(*_run_steps(tail, buffer.take()))

            pending: deque = deque()
            buffer = _Buffer(tail[0].hints.batch_size if tail else self.chunk_size)
            for i in range(0, len(paths), self.chunk_size):
                chunk = paths[i:i + self.chunk_size]
                pending.append((len(chunk), pool.submit(_run_steps, head, Source.batch(chunk))))
                if len(pending) >= self.queue_depth:
                    drain(*pending.popleft())
            while pending:
                drain(*pending.popleft())
            if buffer.rows:
                finish(*_run_steps(tail, buffer.take()))
        return RunStats(len(paths), out.rows, dead.rows, time.perf_counter() - start, first)


def _run_steps(steps: tuple[Operator, ...], batch: pa.RecordBatch):
    """Run steps in order; returns (surviving rows, all dead letters)."""
    dead = []
    for step in steps:
        if batch.num_rows == 0:
            break
        batch, dl = step.process(batch)
        dead.append(dl)
    return batch, pa.concat_batches(dead) if dead else NO_DEAD_LETTERS


class _Buffer:
    """Collects rows until a batch of ``size`` can be taken."""

    def __init__(self, size: int):
        self.size, self.batches, self.rows = size, [], 0

    def add(self, batch: pa.RecordBatch):
        if batch.num_rows:
            self.batches.append(batch)
            self.rows += batch.num_rows

    def full(self) -> bool:
        return self.rows >= self.size

    def take(self) -> pa.RecordBatch:
        whole = pa.concat_batches(self.batches)
        head, rest = whole.slice(0, self.size), whole.slice(self.size)
        self.batches, self.rows = ([rest] if rest.num_rows else []), rest.num_rows
        return head


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", disable=not enabled, smoothing=0.1, mininterval=0.5)

"""The Beam adapter: beamzoo operators as Beam PTransforms.

Elements are Arrow record batches. Each operator becomes one ParDo with two
outputs, the rows it produced and its dead letters, so a bad record never
fails a bundle. This is the only module in the package that imports Beam.
"""
from __future__ import annotations

import os
import time

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.parquetio import WriteToParquetBatched
from apache_beam.metrics import Metrics

from beamzoo.core import Graph, Operator, Source
from beamzoo.schemas import DEAD_LETTER_SCHEMA

DEAD_LETTER = "dead_letter"


class _OperatorFn(beam.DoFn):
    def __init__(self, op: Operator):
        self.op = op
        self.ok = Metrics.counter("beamzoo", f"{op.name}_rows")
        self.failed = Metrics.counter("beamzoo", f"{op.name}_failed")

    def setup(self):
        self.op.setup()

    def process(self, batch: pa.RecordBatch):
        out, dead = self.op.process(batch)
        if out.num_rows:
            self.ok.inc(out.num_rows)
            yield out
        if dead.num_rows:
            self.failed.inc(dead.num_rows)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead)


class ApplyOperator(beam.PTransform):
    """PCollection[RecordBatch] -> (rows, dead letters), both PCollection[RecordBatch]."""

    def __init__(self, op: Operator):
        super().__init__(op.name)
        self.op = op

    def expand(self, batches):
        outputs = batches | beam.ParDo(_OperatorFn(self.op)).with_outputs(DEAD_LETTER, main="rows")
        return outputs.rows, outputs[DEAD_LETTER]


class ListFiles(beam.PTransform):
    """PBegin -> PCollection[RecordBatch of paths], spread over workers.

    The listing runs on one worker; the Reshuffle breaks fusion so that the
    work after it is shared by all workers.
    """

    def __init__(self, source: Source, batch_size: int):
        super().__init__()
        self.source, self.batch_size = source, batch_size

    def expand(self, pbegin):
        return (pbegin
                | "Start" >> beam.Create([None])
                | "Match" >> beam.FlatMap(lambda _, source: source.paths(), self.source)
                | "Spread" >> beam.Reshuffle()
                | "Batch" >> beam.BatchElements(min_batch_size=self.batch_size,
                                                max_batch_size=self.batch_size)
                | "ToArrow" >> beam.Map(Source.batch))


class RunGraph(beam.PTransform):
    """PBegin -> {"rows": ..., "dead_letter": ...}, both PCollection[RecordBatch]."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph

    def expand(self, pbegin):
        size = max((s.hints.batch_size for s in self.graph.steps), default=16)
        rows = pbegin | "ListFiles" >> ListFiles(self.graph.source, size)
        dead = []
        for step in self.graph.steps:
            rows, step_dead = rows | step.name >> ApplyOperator(step)
            dead.append(step_dead)
        dead_letters = dead | "DeadLetters" >> beam.Flatten() if dead else (
            pbegin | "NoDeadLetters" >> beam.Create([]))
        return {"rows": rows, DEAD_LETTER: dead_letters}


class WriteParquet(beam.PTransform):
    """PCollection[RecordBatch] -> ``directory/<prefix>-SSSSS-of-NNNNN.parquet``.

    Beam's file sink writes to a temporary folder and renames the files into
    place when the write is final, so a reader never sees half a file.
    """

    def __init__(self, directory: str, prefix: str, schema: pa.Schema, counter: str | None = None,
                 clock: str | None = None):
        super().__init__()
        self.directory, self.prefix, self.schema = directory, prefix, schema
        self.counter = counter or f"{prefix}_written"
        self.clock = clock  # a distribution of when (ms since the epoch) batches arrived

    def expand(self, batches):
        counter = Metrics.counter("beamzoo", self.counter)
        clock = Metrics.distribution("beamzoo", self.clock) if self.clock else None

        def to_table(batch):
            counter.inc(batch.num_rows)
            if clock:
                clock.update(int(time.time() * 1000))
            return pa.Table.from_batches([batch])

        return (batches
                | "ToTable" >> beam.Map(to_table)
                | "Write" >> WriteToParquetBatched(
                    os.path.join(self.directory, self.prefix), self.schema,
                    file_name_suffix=".parquet"))


class ScoreToParquet(beam.PTransform):
    """PBegin -> runs the graph; writes ``predictions-<run>-*.parquet`` and
    ``dead_letter-<run>-*.parquet`` under ``directory``."""

    def __init__(self, graph: Graph, directory: str, run: str = "run"):
        super().__init__()
        self.graph, self.directory, self.run = graph, directory, run

    def expand(self, pbegin):
        out = pbegin | "Score" >> RunGraph(self.graph)
        out["rows"] | "WritePredictions" >> WriteParquet(
            self.directory, f"predictions-{self.run}", self.graph.schema, counter="scored",
            clock="predictions_time_ms")
        out[DEAD_LETTER] | "WriteDeadLetters" >> WriteParquet(
            self.directory, f"{DEAD_LETTER}-{self.run}", DEAD_LETTER_SCHEMA, counter="failed")
        return out

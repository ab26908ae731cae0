"""Running a graph on a Beam runner (DirectRunner, FlinkRunner, ...)."""
from __future__ import annotations

import glob
import os
import time

import pyarrow.parquet as pq

from beamzoo.core import Graph
from beamzoo.runners.edge import RunStats


def _runner(options):
    """DirectRunner means Beam's in-process Python runner (no Prism download)."""
    from apache_beam.options.pipeline_options import StandardOptions
    name = options.view_as(StandardOptions).runner
    if name in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return FnApiRunner()
    return None


def count_rows(directory: str, prefix: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in glob.glob(os.path.join(directory, f"{prefix}-*.parquet")))


def run(graph: Graph, output: str, argv: list[str], inputs: int) -> RunStats:
    """Build the Beam pipeline for ``graph``, run it to the end, count what it wrote."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beamzoo.transforms.beam import DEAD_LETTER, ScoreToParquet

    options = PipelineOptions(argv)
    start = time.perf_counter()
    with beam.Pipeline(runner=_runner(options), options=options) as p:
        p | "ScoreToParquet" >> ScoreToParquet(graph, output)
    return RunStats(inputs, count_rows(output, "predictions"), count_rows(output, DEAD_LETTER),
                    time.perf_counter() - start)

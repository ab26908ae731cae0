"""Running a graph on a Beam runner (DirectRunner, FlinkRunner, ...)."""
from __future__ import annotations

from beamzoo.core import Graph


def _runner(options):
    """DirectRunner means Beam's in-process Python runner (no Prism download)."""
    from apache_beam.options.pipeline_options import StandardOptions
    name = options.view_as(StandardOptions).runner
    if name in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return FnApiRunner()
    return None


def run(graph: Graph, output: str, argv: list[str], run: str) -> None:
    """Build the Beam pipeline for ``graph`` and run it to the end."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beamzoo.transforms.beam import ScoreToParquet

    options = PipelineOptions(argv)
    with beam.Pipeline(runner=_runner(options), options=options) as p:
        p | "ScoreToParquet" >> ScoreToParquet(graph, output, run)

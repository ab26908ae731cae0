"""beamzoo: model-inference dataflows on Arrow batches.

A pipeline is a graph of frozen, typed steps (``beamzoo.graph``) built with
``|`` and run unchanged on the edge runner (no Beam), Beam's DirectRunner or
FlinkRunner. The core, the operators and the edge runner never import Apache
Beam; ``beamzoo.transforms.beam`` holds the operators as Beam PTransforms for
users' own Beam pipelines, and ``beam_options`` prepares such a pipeline's
options.
"""
from beamzoo.core import Knob, KnobError, Operator, Result, RowOperator
from beamzoo.graph import Composite, Graph, GraphError, Stream
from beamzoo.cascade import Cascade
from beamzoo.gates import Gate
from beamzoo.pipeline import Classify, Pipeline, run
from beamzoo.policies import Deadline
from beamzoo.runners.edge import EdgeRunner, RunStats
from beamzoo.schemas import SchemaMismatchError, TensorSpec
from beamzoo.transforms.flow import Collect, Drop, Merge, Route, Tiles
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeImage, DecodeResize, ResizeCrop
from beamzoo.transforms.sinks import WriteJsonl, WriteParquet
from beamzoo.transforms.sources import Files, Manifest, Rows


def beam_options(argv=None):
    """``PipelineOptions`` for a Beam pipeline of yours, ready for DirectRunner or FlinkRunner
    (``with beamzoo.beam_options(argv) as options, beam.Pipeline(options=options) as p:``)."""
    from beamzoo.runners.options import beam_options as prepare
    return prepare(argv)


__version__ = "0.2.0"
__all__ = ["Cascade", "Classify", "Collect", "Composite", "Deadline", "DecodeImage", "DecodeResize", "Drop", "EdgeRunner",
           "Files", "Gate", "Graph", "GraphError", "Knob", "KnobError", "Manifest", "Merge", "OnnxInference", "Operator",
           "Pipeline", "ReadFiles", "ResizeCrop", "Result", "Route", "RowOperator", "Rows", "RunStats",
           "SchemaMismatchError", "Stream", "Tiles", "TensorSpec", "TopK", "WriteJsonl", "WriteParquet",
           "beam_options", "run"]

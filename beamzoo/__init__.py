"""beamzoo: model-inference dataflows on Arrow batches.

A pipeline is a graph of frozen, typed steps (``beamzoo.core``) built with
``|`` and run unchanged on the edge runner (no Beam), Beam's DirectRunner or
FlinkRunner. The core, the operators and the edge runner never import Apache
Beam; ``beamzoo.beam`` holds the operators as Beam PTransforms for users' own
Beam pipelines, and ``beam_options`` prepares such a pipeline's options.

This module is the front door: it imports every layer (core -> zoo -> ops ->
executors -> applications) and nothing imports it back.
"""
from beamzoo.cascade import Cascade
from beamzoo.classify import Classify, ClassifyBytes
from beamzoo.core import (Composite, Graph, GraphError, Hooks, Knob, KnobError, Operator, Result, RowOperator,
                          RunContext, RunStats, SchemaMismatchError, StepMetrics, Stream, TensorSpec, register)
from beamzoo.core.limits import TooManyDeadLetters
from beamzoo.ocr import ReadText
from beamzoo.pipeline import Pipeline, run
from beamzoo.runners.edge import EdgeRunner
from beamzoo.runners.options import beam_options
from beamzoo.transforms import (Collect, Deadline, DecodeImage, DecodeResize, Drop, Files, Gate, Manifest, Merge,
                                OnnxInference, ReadFiles, RemoteClassify, ResizeCrop, Route, Rows, Tiles, TopK,
                                WriteJsonl, WriteParquet)
from beamzoo.version import __version__


__all__ = ["Cascade", "Classify", "ClassifyBytes", "Collect", "Composite", "Deadline", "DecodeImage", "DecodeResize",
           "Drop", "EdgeRunner", "Files", "Gate", "Graph", "GraphError", "Hooks", "Knob", "KnobError", "Manifest",
           "Merge", "OnnxInference", "Operator", "Pipeline", "ReadFiles", "ReadText", "RemoteClassify", "ResizeCrop",
           "Result", "Route", "RowOperator", "Rows", "RunContext", "RunStats", "SchemaMismatchError", "StepMetrics",
           "Stream", "TensorSpec", "Tiles", "TooManyDeadLetters", "TopK", "WriteJsonl", "WriteParquet", "__version__",
           "beam_options", "register", "run"]

"""The core: the operator model, graphs, the compiler, run contexts, kernels and metrics.

Nothing here imports another part of beamzoo, nor Apache Beam: the layers above
(the model zoo, the ops in ``beamzoo.transforms``, the executors in
``beamzoo.runners``, the applications, serving and bundles) build on it.
"""
from beamzoo.core.compile import Plan, Stage, compile, rewire
from beamzoo.core.context import Hooks, RunContext
from beamzoo.core.graph import DEAD, Composite, Graph, GraphBuilder, GraphError, Ports, Step, Stream
from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.metrics import RunStats, StepMetrics
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result, RowOperator, dead_letters, error_text
from beamzoo.core.registry import register
from beamzoo.core.schemas import SchemaMismatchError, TensorSpec

__all__ = ["Composite", "DEAD", "Graph", "GraphBuilder", "GraphError", "Hooks", "Knob", "KnobError",
           "NO_DEAD_LETTERS", "Operator", "Plan", "Ports", "Result", "RowOperator", "RunContext", "RunStats",
           "SchemaMismatchError", "Stage", "Step", "StepMetrics", "Stream", "TensorSpec", "compile",
           "dead_letters", "error_text", "register", "rewire"]

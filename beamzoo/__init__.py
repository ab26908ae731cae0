"""beamzoo: model-inference dataflows on Arrow batches.

The core (``beamzoo.core``, ``beamzoo.schemas``), the operators in
``beamzoo.transforms`` (but ``beamzoo.transforms.beam``) and the edge runner
never import Apache Beam.
"""
from beamzoo.core import Graph, Hints, Operator, Result, RowOperator, Source
from beamzoo.schemas import SchemaMismatchError, TensorSpec

__version__ = "0.1.0"
__all__ = ["Graph", "Hints", "Operator", "Result", "RowOperator", "Source",
           "SchemaMismatchError", "TensorSpec"]

"""FLOPs of an ONNX image model for one input, counted from its graph.

Counts the multiply-adds of Conv, Gemm and MatMul (2 FLOPs each), the ops
that hold nearly all of a CNN's work; elementwise ops, pooling and the
(de)quantization of a QDQ model are left out, so an int8 model counts as the
fp32 graph it was made from.
"""
from __future__ import annotations

import math

import onnx
from onnx import shape_inference


def _dims(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def count_flops(model_bytes: bytes, batch: int = 1) -> int:
    """FLOPs (2 per multiply-add) of Conv/Gemm/MatMul for a batch of ``batch``."""
    model = onnx.load_from_string(model_bytes)
    for inp in model.graph.input:  # fix the dynamic batch axis so shapes can be inferred
        dim = inp.type.tensor_type.shape.dim[0]
        if dim.dim_param:
            dim.ClearField("dim_param")
            dim.dim_value = batch
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: _dims(v) for v in
              list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    # In a QDQ model a weight reaches its Conv through DequantizeLinear: same shape.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, out = shapes[node.input[1]], shapes[node.output[0]]
            total += 2 * math.prod(out) * math.prod(w[1:])  # each output: C_in/group x k x k
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            total += 2 * math.prod(out) * (a[-2] if trans_a else a[-1])
    if not total:
        raise ValueError("no Conv, Gemm or MatMul with known shapes in this model")
    return total

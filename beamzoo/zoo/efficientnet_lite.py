"""EfficientNet-Lite0 as an ONNX graph, built with numpy + onnx from a state dict.

Mirrors ``efficientnet_lite_pytorch`` (0.1.0) for ``efficientnet-lite0``:
TF-style static "same" padding for a 224x224 input (any extra pixel goes on the
bottom/right), BatchNorm eps 1e-3 (folded into the convs here), ReLU6, no
squeeze-excite, stem and head not width-scaled, and an identity skip on blocks
with stride 1 and equal in/out channels (drop-connect is a no-op at inference).
"""

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

IMAGE_SIZE = 224
BN_EPS = 1e-3
# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage.
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def _same_pads(size, kernel, stride):
    """TF "SAME" pads [top, left, bottom, right] for a square input of `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2]


class _Graph:
    """Collects nodes and initializers in a fixed order (so output is deterministic)."""

    def __init__(self, sd):
        self.sd, self.nodes = sd, []
        self.inits = [numpy_helper.from_array(np.array(0, np.float32), "relu6.min"),
                      numpy_helper.from_array(np.array(6, np.float32), "relu6.max")]

    def conv_bn(self, x, conv, bn, size, stride=1, group=1, relu6=True):
        """Conv (no bias) + BatchNorm folded into one Conv, then optional ReLU6."""
        w = self.sd[conv + ".weight"].astype(np.float64)
        gamma, beta, mean, var = (self.sd[f"{bn}.{k}"].astype(np.float64) for k in
                                  ("weight", "bias", "running_mean", "running_var"))
        scale = gamma / np.sqrt(var + BN_EPS)
        w = (w * scale[:, None, None, None]).astype(np.float32)
        b = (beta - mean * scale).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, conv + ".weight"),
                       numpy_helper.from_array(b, conv + ".bias")]
        k = w.shape[-1]
        y = conv + ".out"
        self.nodes.append(helper.make_node(
            "Conv", [x, conv + ".weight", conv + ".bias"], [y], name=conv,
            kernel_shape=[k, k], strides=[stride, stride], group=group,
            pads=_same_pads(size, k, stride)))
        if relu6:
            y = self.relu6(y, conv + ".relu6")
        return y

    def relu6(self, x, name):
        self.nodes.append(helper.make_node("Clip", [x, "relu6.min", "relu6.max"],
                                           [name], name=name))
        return name


def build_onnx(state_dict, num_classes=1000):
    """Build EfficientNet-Lite0 (input ``images`` [N,3,224,224], output ``logits``)."""
    g, size = _Graph(state_dict), IMAGE_SIZE
    x = g.conv_bn("images", "_conv_stem", "_bn0", size, stride=2)
    size = math.ceil(size / 2)

    i = 0
    for repeats, k, stride, expand, cin, cout in BLOCKS:
        for r in range(repeats):
            s, c_in = (stride, cin) if r == 0 else (1, cout)
            p, inp = f"_blocks.{i}", x
            if expand != 1:
                x = g.conv_bn(x, p + "._expand_conv", p + "._bn0", size)
            ch = c_in * expand
            x = g.conv_bn(x, p + "._depthwise_conv", p + "._bn1", size, stride=s, group=ch)
            size = math.ceil(size / s)
            x = g.conv_bn(x, p + "._project_conv", p + "._bn2", size, relu6=False)
            if s == 1 and c_in == cout:  # identity skip
                g.nodes.append(helper.make_node("Add", [x, inp], [p + ".add"], name=p + ".add"))
                x = p + ".add"
            i += 1

    x = g.conv_bn(x, "_conv_head", "_bn1", size)
    fc_w, fc_b = state_dict["_fc.weight"], state_dict["_fc.bias"]
    if fc_w.shape[0] != num_classes:
        raise ValueError(f"_fc.weight has {fc_w.shape[0]} classes, expected {num_classes}")
    g.inits += [numpy_helper.from_array(fc_w.astype(np.float32), "_fc.weight"),
                numpy_helper.from_array(fc_b.astype(np.float32), "_fc.bias")]
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "_fc.weight", "_fc.bias"], ["logits"],
                         name="_fc", transB=1),
    ]

    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                       ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        initializer=g.inits)
    model = helper.make_model(graph, producer_name="beamzoo",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # IR version that goes with opset 17
    return model

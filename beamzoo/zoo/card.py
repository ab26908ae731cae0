"""Model cards as data: a YAML or JSON file that says what a model is and takes.

A card names its ONNX file (relative to the card) and pins it by sha256; its
``inputs`` and ``outputs`` are typed tensors, checked against the ONNX file
before anything is scored. ``load_card`` refuses a card with a missing field,
a wrong type, a missing file, a wrong hash, labels that do not fit the output
or a signature that does not fit the model, naming the card file and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beamzoo.schemas import TensorSpec

TASKS = ("image-classification", "text-detection", "text-recognition", "text-direction", "other")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
REQUIRED = ("name", "version", "task", "file", "sha256", "inputs", "outputs")
OPTIONAL = ("labels", "tags", "license", "source", "metrics", "preprocess", "build")
LAYOUTS = {"NCHW": 3, "NHWC": 3, "NC": 1}
CHANNELS = ("RGB", "BGR", "GRAY")
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool")


def cache_dir() -> Path:
    return Path(os.environ.get("BEAMZOO_CACHE", Path.home() / ".cache" / "beamzoo"))


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CardError(ValueError):
    """A card file that cannot be used: names the file and the field."""

    def __init__(self, where: str, field_name: str | None, message: str):
        self.where, self.field = where, field_name
        at = f" field {field_name!r}" if field_name else ""
        super().__init__(f"model card {where}{at}: {message}")


class ModelIntegrityError(RuntimeError):
    """A model file does not match the sha256 its card pins, or not its signature."""


@dataclass(frozen=True)
class Tensor:
    """One named tensor of a model's signature; ``spec`` has no batch axis."""

    name: str
    spec: TensorSpec

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def shape(self) -> tuple[int | None, ...]:
        return self.spec.shape

    def as_dict(self) -> dict:
        s = self.spec
        d = {"name": self.name, "dtype": s.dtype, "shape": list(s.shape)}
        for k in ("layout", "channels"):
            if getattr(s, k) is not None:
                d[k] = getattr(s, k)
        if s.value_range is not None:
            d["value_range"] = list(s.value_range)
        return d


@dataclass(frozen=True)
class ModelCard:
    """A versioned model with a typed signature, pinned by the sha256 of its file.

    ``file`` is the ONNX file's absolute path (for a built-in card, where its
    build is cached). ``build`` (built-in cards only) says how to make it offline.
    """

    name: str
    version: str
    task: str
    file: str
    sha256: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    labels: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    license: str | None = None
    source: str | None = None
    metrics: dict = field(default_factory=dict, compare=False, hash=False)
    preprocess: dict = field(default_factory=dict, compare=False, hash=False)
    build: dict | None = field(default=None, compare=False, hash=False)
    card_path: str | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    # The single image input and single output of a classifier.
    @property
    def input(self) -> TensorSpec:
        return self.inputs[0].spec

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0].spec

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @property
    def resize(self) -> int | None:
        return self.preprocess.get("resize")

    def metric(self, name: str) -> float | None:
        m = self.metrics.get(name)
        return None if m is None else m["value"]

    def model_bytes(self) -> bytes:
        """The model file's bytes, once their sha256 is the card's pin and their
        signature the card's; a built-in model is built into the cache on first use.
        Make sessions from these bytes, never by opening the path again."""
        from beamzoo.zoo.verify import verified_bytes
        return verified_bytes(self)

    def onnx_path(self) -> Path:
        """The model file, verified (for tools that need a path)."""
        self.model_bytes()
        return Path(self.file)

    def to_param(self) -> str | dict:
        """The card as JSON data for a graph step: a built-in by reference, else whole."""
        from beamzoo.zoo.repository import builtin
        return self.ref if builtin(self.ref) == self else self.as_dict()

    def identity(self) -> dict:
        """What defines the model's answers, for fingerprints: the card without
        where its file lies (a moved bundle keeps its resume keys)."""
        d = self.as_dict()
        for k in ("file", "card_path", "metrics", "source", "license", "tags", "build"):
            d.pop(k, None)
        d["labels"] = hashlib.sha256("\n".join(self.labels).encode()).hexdigest()
        return d

    def as_dict(self) -> dict:
        """The whole card as JSON data; ``card_from_dict`` reads it back."""
        d = {"name": self.name, "version": self.version, "task": self.task, "file": self.file,
             "sha256": self.sha256, "inputs": [t.as_dict() for t in self.inputs],
             "outputs": [t.as_dict() for t in self.outputs], "labels": list(self.labels),
             "tags": list(self.tags), "license": self.license, "source": self.source,
             "metrics": self.metrics, "preprocess": self.preprocess}
        if self.build is not None:
            d["build"] = self.build
        if self.card_path is not None:
            d["card_path"] = self.card_path
        return d

    @classmethod
    def from_param(cls, param: str | dict | ModelCard) -> ModelCard:
        if isinstance(param, ModelCard):
            return param
        from beamzoo.zoo.repository import get
        if isinstance(param, str):
            return get(param)
        d = dict(param)
        d.pop("build", None)  # a card inside a graph names its file; it is never built from there
        where = d.get("card_path") or f"{d.get('name')}:{d.get('version')}"
        return card_from_dict(d, where, base=None)

    def summary(self) -> str:
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in self.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in self.outputs)
        return f"{self.ref} ({self.task}): {ins} -> {outs}"


def load_card(path: str | os.PathLike, builtin: bool = False, verify: bool = True) -> ModelCard:
    """Read and check a card file (YAML or JSON). A user's card is verified at once:
    its file's sha256 and its signature against the ONNX file."""
    path = Path(path).absolute()
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CardError(where, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(where, None, f"cannot be read: {exc}") from None
    data = _parse(text, where)
    card = card_from_dict(data, where, base=path.parent, builtin=builtin)
    if verify and not builtin:
        card.model_bytes()
    return card


def _parse(text: str, where: str) -> dict:
    if where.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CardError(where, None, f"is not valid JSON: {exc}") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CardError(where, None, f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CardError(where, None, f"must be a mapping of fields, got {type(data).__name__}")
    return data


def card_from_dict(d: dict, where: str, base: Path | None, builtin: bool = False) -> ModelCard:
    """A card from its fields; relative paths resolve against ``base`` (the card's folder)."""
    internal = ("card_path",) if base is None else ()  # a card inside a graph remembers its file
    unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL) - set(internal))
    if unknown:
        raise CardError(where, unknown[0], f"is not a card field; the fields are {', '.join(REQUIRED + OPTIONAL)}")
    for k in REQUIRED:
        if d.get(k) is None:
            raise CardError(where, k, "is required")
    name, version = _text(d, "name", where), _version(d, where)
    if not NAME.match(name):
        raise CardError(where, "name", f"{name!r} must be lower-case letters, digits, '_', '.', '-'")
    task = _text(d, "task", where)
    if task not in TASKS:
        raise CardError(where, "task", f"{task!r} is not one of {', '.join(TASKS)}")
    sha = _text(d, "sha256", where).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CardError(where, "sha256", f"{sha!r} is not a sha256 (64 hex digits)")
    build = d.get("build")
    if build is not None and not builtin:
        raise CardError(where, "build", "only beamzoo's built-in cards are built; give the ONNX file in 'file'")
    file = _file(d, where, base, name, version, build)
    inputs = _tensors(d, "inputs", where)
    outputs = _tensors(d, "outputs", where)
    labels = _labels(d, where, base, task, outputs)
    card = ModelCard(
        name=name, version=version, task=task, file=file, sha256=sha, inputs=inputs, outputs=outputs,
        labels=labels, tags=tuple(_list_of_text(d, "tags", where)), license=_opt_text(d, "license", where),
        source=_opt_text(d, "source", where), metrics=_metrics(d, where),
        preprocess=_preprocess(d, where, inputs), build=build,
        card_path=where if base is not None else d.get("card_path"))
    return card


def _text(d: dict, k: str, where: str) -> str:
    v = d[k]
    if not isinstance(v, str) or not v.strip():
        raise CardError(where, k, f"must be a non-empty string, got {v!r}")
    return v.strip()


def _opt_text(d: dict, k: str, where: str) -> str | None:
    return None if d.get(k) is None else _text(d, k, where)


def _version(d: dict, where: str) -> str:
    v = d["version"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise CardError(where, "version", f"must be a string such as \"1\" or \"2.1\", got {v!r}")
    v = str(v).strip()
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._-]*", v):
        raise CardError(where, "version", f"{v!r} must be letters, digits, '.', '_', '-'")
    return v


def _file(d, where, base, name, version, build) -> str:
    rel = _text(d, "file", where)
    if build is not None:  # a built-in model is built into the cache, in a folder of its pin
        if "/" in rel or "\\" in rel:
            raise CardError(where, "file", f"a built file is a plain name, got {rel!r}")
        pin = str(d.get("sha256", ""))[:16]
        return str(cache_dir() / "models" / name / version / pin / rel)
    path = Path(rel)
    if base is None:  # a card inside a graph: its file is checked when the model is loaded
        return rel
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise CardError(where, "file", f"{path} does not exist (the ONNX file, relative to the card)")
    return str(path)


def _list_of_text(d: dict, k: str, where: str) -> list[str]:
    v = d.get(k)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CardError(where, k, f"must be a list of strings, got {v!r}")
    return v


def _tensors(d: dict, k: str, where: str) -> tuple[Tensor, ...]:
    v = d[k]
    if not isinstance(v, list) or not v:
        raise CardError(where, k, "must be a list of one or more {name, dtype, shape} entries")
    out, seen = [], set()
    for i, t in enumerate(v):
        at = f"{k}[{i}]"
        if not isinstance(t, dict):
            raise CardError(where, at, f"must be a mapping {{name, dtype, shape}}, got {t!r}")
        bad = sorted(set(t) - {"name", "dtype", "shape", "layout", "channels", "value_range"})
        if bad:
            raise CardError(where, f"{at}.{bad[0]}", "is not a tensor field (name, dtype, shape, layout, "
                            "channels, value_range)")
        for req in ("name", "dtype", "shape"):
            if t.get(req) is None:
                raise CardError(where, f"{at}.{req}", "is required")
        tname = t["name"]
        if not isinstance(tname, str) or not tname:
            raise CardError(where, f"{at}.name", f"must be a non-empty string, got {tname!r}")
        if tname in seen:
            raise CardError(where, f"{at}.name", f"{tname!r} is listed twice")
        seen.add(tname)
        if t["dtype"] not in DTYPES:
            raise CardError(where, f"{at}.dtype", f"{t['dtype']!r} is not one of {', '.join(DTYPES)}")
        shape = t["shape"]
        if not isinstance(shape, list) or not all(
                s is None or (isinstance(s, int) and not isinstance(s, bool) and s > 0) for s in shape):
            raise CardError(where, f"{at}.shape", f"must be a list of positive sizes or null (dynamic), "
                            f"without the batch axis; got {shape!r}")
        layout, channels, vr = t.get("layout"), t.get("channels"), t.get("value_range")
        if layout is not None and (layout not in LAYOUTS or LAYOUTS[layout] != len(shape)):
            raise CardError(where, f"{at}.layout", f"{layout!r} does not fit shape {shape} "
                            f"(NCHW or NHWC for [C, H, W] / [H, W, C], NC for [C])")
        if channels is not None and channels not in CHANNELS:
            raise CardError(where, f"{at}.channels", f"{channels!r} is not one of {', '.join(CHANNELS)}")
        if vr is not None and (not isinstance(vr, list) or len(vr) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in vr) or vr[0] >= vr[1]):
            raise CardError(where, f"{at}.value_range", f"must be [low, high] with low < high, got {vr!r}")
        if layout in ("NCHW", "NHWC") and channels is None:
            raise CardError(where, f"{at}.channels", "an image input needs its channel order (RGB, BGR, GRAY)")
        if layout in ("NCHW", "NHWC") and vr is None:
            raise CardError(where, f"{at}.value_range", "an image input needs the range pixels 0..255 map to")
        out.append(Tensor(tname, TensorSpec(t["dtype"], tuple(shape), layout, channels,
                                            None if vr is None else tuple(vr))))
    return tuple(out)


def _labels(d, where, base, task, outputs) -> tuple[str, ...]:
    v = d.get("labels")
    if v is None:
        if task == "image-classification":
            raise CardError(where, "labels", "a classifier needs its labels: a list, or a text file "
                            "(one per line) relative to the card")
        return ()
    if isinstance(v, str):
        path = Path(v)
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            labels = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
        except OSError as exc:
            raise CardError(where, "labels", f"cannot read the labels file {path}: {exc.strerror or exc}") from None
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        labels = v
    else:
        raise CardError(where, "labels", f"must be a list of strings or a file name, got {type(v).__name__}")
    size = outputs[0].shape[-1] if outputs[0].shape else None
    if task == "image-classification" and size is not None and len(labels) != size:
        raise CardError(where, "labels", f"has {len(labels)} labels, but output {outputs[0].name!r} "
                        f"has {size} classes")
    return tuple(labels)


def _metrics(d, where) -> dict:
    v = d.get("metrics") or {}
    if not isinstance(v, dict):
        raise CardError(where, "metrics", "must be a mapping of name: {value, source}")
    out = {}
    for k, m in v.items():
        at = f"metrics.{k}"
        if not isinstance(m, dict) or set(m) - {"value", "source"} or "value" not in m or "source" not in m:
            raise CardError(where, at, f"must be {{value: NUMBER, source: where the figure comes from}}, got {m!r}")
        if isinstance(m["value"], bool) or not isinstance(m["value"], (int, float)) or not math.isfinite(m["value"]):
            raise CardError(where, f"{at}.value", f"must be a number, got {m['value']!r}")
        if not isinstance(m["source"], str) or not m["source"].strip():
            raise CardError(where, f"{at}.source", "must say where the figure comes from")
        out[str(k)] = {"value": float(m["value"]), "source": m["source"]}
    return out


def _preprocess(d, where, inputs) -> dict[str, Any]:
    v = d.get("preprocess") or {}
    if not isinstance(v, dict) or set(v) - {"resize", "crop"}:
        raise CardError(where, "preprocess", f"must be a mapping with resize and/or crop, got {v!r}")
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise CardError(where, f"preprocess.{k}", f"must be a positive whole number, got {x!r}")
    image = next((t for t in inputs if t.spec.layout in ("NCHW", "NHWC")), None)
    if v.get("crop") is not None and image is not None:
        side = image.shape[1] if image.spec.layout == "NCHW" else image.shape[0]
        if side is not None and side != v["crop"]:
            raise CardError(where, "preprocess.crop", f"is {v['crop']}, but input {image.name!r} takes {side}")
    if v.get("resize") is not None and v.get("crop") is not None and v["resize"] < v["crop"]:
        raise CardError(where, "preprocess.resize", f"{v['resize']} is smaller than the crop {v['crop']}")
    return dict(v)

"""Model cards as data: a YAML or JSON file that says what a model is and takes.

A card names its ONNX file (relative to the card) and pins it by sha256; its
``inputs`` and ``outputs`` are typed tensors, checked against the ONNX file
before anything is scored (``beamzoo.zoo.verify``). ``read_card`` refuses a card
with a missing field, a wrong type, a missing file, or labels that do not fit
the output, naming the card file and the field. The files a card names lie in
its folder (or its repository), links followed, and are regular files of a
bounded size (``beamzoo.zoo.files``); YAML anchors and aliases are refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from beamzoo.core.schemas import TensorSpec
from beamzoo.zoo import files

TASKS = ("image-classification", "text-detection", "text-recognition", "text-direction", "other")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
REQUIRED = ("name", "version", "task", "file", "sha256", "inputs", "outputs")
OPTIONAL = ("labels", "tags", "license", "source", "metrics", "preprocess", "build")
LAYOUTS = {"NCHW": 3, "NHWC": 3, "NC": 1}
CHANNELS = ("RGB", "BGR", "GRAY")
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool")
BUILTIN = Path(__file__).parent / "models"  # the built-in repository
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxdict = 6
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to about 80 characters."""
    return _SHOWN.repr(value)


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
        where = str(where) if len(str(where)) <= 300 else str(where)[:299] + "…"
        self.where, self.field = where, field_name
        at = f" field {shown(field_name)}" if field_name else ""
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

    def summary(self) -> str:
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in self.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in self.outputs)
        return f"{self.ref} ({self.task}): {ins} -> {outs}"


def read_card(path: str | os.PathLike, builtin: bool = False, root: str | os.PathLike | None = None) -> ModelCard:
    """Read and check a card file (YAML or JSON): its fields, not yet its model file
    (``beamzoo.zoo.verify.load_card`` checks that too). The files it names must lie in
    ``root`` (default: the card's folder; for a built-in card, the built-in repository)."""
    path = Path(path).absolute()
    where = str(path)
    try:
        raw = files.read(path, files.CARD_MAX)
    except files.Refused as exc:
        raise CardError(where, None, f"the card file {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CardError(where, None, "is not UTF-8 text") from None
    data = _parse(text, where)
    if root is None:
        root = BUILTIN if builtin else path.parent
    return card_from_dict(data, where, base=path.parent, builtin=builtin, root=Path(root))


class _Loader(yaml.SafeLoader):
    """YAML without anchors and aliases: a card is small, and an alias can make a
    kilobyte of text into gigabytes of data."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "a card has no anchors (&) or aliases (*)",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _parse(text: str, where: str) -> dict:
    try:
        if where.endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise CardError(where, None, f"is not valid JSON: {_cut(exc)}") from None
        else:
            try:
                data = yaml.load(text, Loader=_Loader)
            except yaml.YAMLError as exc:
                raise CardError(where, None, f"is not valid YAML: {_cut(exc)}") from None
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise CardError(where, None, f"has a value that cannot be read: {_cut(exc)}") from None
    except RecursionError:
        raise CardError(where, None, "nests too deeply") from None
    if not isinstance(data, dict):
        raise CardError(where, None, f"must be a mapping of fields, got {type(data).__name__}")
    return data


def _cut(exc: Exception, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def card_from_dict(d: dict, where: str, base: Path | None, builtin: bool = False,
                   root: Path | None = None) -> ModelCard:
    """A card from its fields; relative paths resolve against ``base`` (the card's folder) and
    must lie inside ``root`` (default ``base``). ``base=None``: a card inside a graph, whose
    file is checked when its model is loaded and whose labels are a list."""
    internal = ("card_path",) if base is None else ()  # a card inside a graph remembers its file
    unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL) - set(internal), key=str)
    if unknown:
        raise CardError(where, unknown[0], f"is not a card field; the fields are {', '.join(REQUIRED + OPTIONAL)}")
    for k in REQUIRED:
        if d.get(k) is None:
            raise CardError(where, k, "is required")
    name, version = _text(d, "name", where), _version(d, where)
    if not NAME.match(name):
        raise CardError(where, "name", f"{shown(name)} must be lower-case letters, digits, '_', '.', '-'")
    task = _text(d, "task", where)
    if task not in TASKS:
        raise CardError(where, "task", f"{shown(task)} is not one of {', '.join(TASKS)}")
    sha = _text(d, "sha256", where).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CardError(where, "sha256", f"{shown(sha)} is not a sha256 (64 hex digits)")
    build = d.get("build")
    if build is not None and not builtin:
        raise CardError(where, "build", "only beamzoo's built-in cards are built; give the ONNX file in 'file'")
    root = base if root is None else root
    file = _file(d, where, base, root, name, version, build)
    inputs = _tensors(d, "inputs", where)
    outputs = _tensors(d, "outputs", where)
    labels = _labels(d, where, base, root, task, outputs)
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
        raise CardError(where, k, f"must be a non-empty string, got {shown(v)}")
    return v.strip()


def _opt_text(d: dict, k: str, where: str) -> str | None:
    return None if d.get(k) is None else _text(d, k, where)


def _version(d: dict, where: str) -> str:
    v = d["version"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise CardError(where, "version", f"must be a string such as \"1\" or \"2.1\", got {shown(v)}")
    v = str(v).strip()
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._-]*", v):
        raise CardError(where, "version", f"{shown(v)} must be letters, digits, '.', '_', '-'")
    return v


def _file(d, where, base, root, name, version, build) -> str:
    rel = _text(d, "file", where)
    if build is not None:  # a built-in model is built into the cache, in a folder of its pin
        if "/" in rel or "\\" in rel:
            raise CardError(where, "file", f"a built file is a plain name, got {shown(rel)}")
        pin = str(d.get("sha256", ""))[:16]
        return str(cache_dir() / "models" / name / version / pin / rel)
    if base is None:  # a card inside a graph: its file is checked when the model is loaded
        return rel
    path = _confined(where, "file", rel, base, root, files.MODEL_MAX, "the ONNX file, relative to the card")
    return str(path)


def _confined(where, field_name, rel, base, root, cap, what) -> Path:
    """The file a card names, checked (inside ``root``, regular, at most ``cap`` bytes), not opened."""
    try:
        path = files.confined(rel, base, root)
        files.regular(path, cap)
    except files.Refused as exc:
        raise CardError(where, field_name, f"{shown(rel)} {exc} ({what})") from None
    return path


def _list_of_text(d: dict, k: str, where: str) -> list[str]:
    v = d.get(k)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CardError(where, k, f"must be a list of strings, got {shown(v)}")
    return v


def _tensors(d: dict, k: str, where: str) -> tuple[Tensor, ...]:
    v = d[k]
    if not isinstance(v, list) or not v:
        raise CardError(where, k, "must be a list of one or more {name, dtype, shape} entries")
    out, seen = [], set()
    for i, t in enumerate(v):
        at = f"{k}[{i}]"
        if not isinstance(t, dict):
            raise CardError(where, at, f"must be a mapping {{name, dtype, shape}}, got {shown(t)}")
        bad = sorted(set(t) - {"name", "dtype", "shape", "layout", "channels", "value_range"})
        if bad:
            raise CardError(where, f"{at}.{bad[0]}", "is not a tensor field (name, dtype, shape, layout, "
                            "channels, value_range)")
        for req in ("name", "dtype", "shape"):
            if t.get(req) is None:
                raise CardError(where, f"{at}.{req}", "is required")
        tname = t["name"]
        if not isinstance(tname, str) or not tname:
            raise CardError(where, f"{at}.name", f"must be a non-empty string, got {shown(tname)}")
        if tname in seen:
            raise CardError(where, f"{at}.name", f"{shown(tname)} is listed twice")
        seen.add(tname)
        if t["dtype"] not in DTYPES:
            raise CardError(where, f"{at}.dtype", f"{shown(t['dtype'])} is not one of {', '.join(DTYPES)}")
        shape = t["shape"]
        if not isinstance(shape, list) or not all(
                s is None or (isinstance(s, int) and not isinstance(s, bool) and s > 0) for s in shape):
            raise CardError(where, f"{at}.shape", f"must be a list of positive sizes or null (dynamic), "
                            f"without the batch axis; got {shown(shape)}")
        layout, channels, vr = t.get("layout"), t.get("channels"), t.get("value_range")
        if layout is not None and (layout not in LAYOUTS or LAYOUTS[layout] != len(shape)):
            raise CardError(where, f"{at}.layout", f"{shown(layout)} does not fit shape {shown(shape)} "
                            f"(NCHW or NHWC for [C, H, W] / [H, W, C], NC for [C])")
        if channels is not None and channels not in CHANNELS:
            raise CardError(where, f"{at}.channels", f"{shown(channels)} is not one of {', '.join(CHANNELS)}")
        if vr is not None and (not isinstance(vr, list) or len(vr) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in vr) or vr[0] >= vr[1]):
            raise CardError(where, f"{at}.value_range", f"must be [low, high] with low < high, got {shown(vr)}")
        if layout in ("NCHW", "NHWC") and channels is None:
            raise CardError(where, f"{at}.channels", "an image input needs its channel order (RGB, BGR, GRAY)")
        if layout in ("NCHW", "NHWC") and vr is None:
            raise CardError(where, f"{at}.value_range", "an image input needs the range pixels 0..255 map to")
        out.append(Tensor(tname, TensorSpec(t["dtype"], tuple(shape), layout, channels,
                                            None if vr is None else tuple(vr))))
    return tuple(out)


def _labels(d, where, base, root, task, outputs) -> tuple[str, ...]:
    v = d.get("labels")
    if v is None:
        if task == "image-classification":
            raise CardError(where, "labels", "a classifier needs its labels: a list, or a text file "
                            "(one per line) relative to the card")
        return ()
    if isinstance(v, str):
        if base is None:
            raise CardError(where, "labels", "a card inside a graph lists its labels; it names no labels file")
        what = "the labels file, one label per line, relative to the card"
        path = _confined(where, "labels", v, base, root, files.LABELS_MAX, what)
        try:
            text = files.read(path, files.LABELS_MAX).decode("utf-8")
        except files.Refused as exc:
            raise CardError(where, "labels", f"{shown(v)} {exc} ({what})") from None
        except UnicodeDecodeError:
            raise CardError(where, "labels", f"{shown(v)} is not UTF-8 text ({what})") from None
        labels = [line for line in text.splitlines() if line]
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        labels = v
    else:
        raise CardError(where, "labels", f"must be a list of strings or a file name, got {type(v).__name__}")
    size = outputs[0].shape[-1] if outputs[0].shape else None
    if task == "image-classification" and size is not None and len(labels) != size:
        raise CardError(where, "labels", f"has {len(labels)} labels, but output {shown(outputs[0].name)} "
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
            raise CardError(where, at, "must be {value: NUMBER, source: where the figure comes from}, "
                            f"got {shown(m)}")
        if isinstance(m["value"], bool) or not isinstance(m["value"], (int, float)) or not math.isfinite(m["value"]):
            raise CardError(where, f"{at}.value", f"must be a number, got {shown(m['value'])}")
        if not isinstance(m["source"], str) or not m["source"].strip():
            raise CardError(where, f"{at}.source", "must say where the figure comes from")
        out[str(k)] = {"value": float(m["value"]), "source": m["source"]}
    return out


def _preprocess(d, where, inputs) -> dict[str, Any]:
    v = d.get("preprocess") or {}
    if not isinstance(v, dict) or set(v) - {"resize", "crop"}:
        raise CardError(where, "preprocess", f"must be a mapping with resize and/or crop, got {shown(v)}")
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise CardError(where, f"preprocess.{k}", f"must be a positive whole number, got {shown(x)}")
    image = next((t for t in inputs if t.spec.layout in ("NCHW", "NHWC")), None)
    if v.get("crop") is not None and image is not None:
        side = image.shape[1] if image.spec.layout == "NCHW" else image.shape[0]
        if side is not None and side != v["crop"]:
            raise CardError(where, "preprocess.crop",
                            f"is {shown(v['crop'])}, but input {shown(image.name)} takes {side}")
    if v.get("resize") is not None and v.get("crop") is not None and v["resize"] < v["crop"]:
        raise CardError(where, "preprocess.resize", f"{shown(v['resize'])} is smaller than the crop {shown(v['crop'])}")
    return dict(v)


def classifier_problem(card: ModelCard) -> str | None:
    """Why ``card`` cannot classify images (one image input, one output of scores), or None."""
    if card.task != "image-classification":
        return f"is a {card.task} model, not an image classifier"
    if len(card.inputs) != 1 or card.inputs[0].spec.layout not in ("NCHW", "NHWC") or not card.input.fixed:
        return "does not take one fixed-size image input (layout NCHW or NHWC)"
    if len(card.outputs) != 1 or len(card.output.shape) != 1 or not card.output.fixed:
        return "does not give one output of class scores"
    return None

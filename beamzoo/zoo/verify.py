"""A model file is used only as the bytes its card pins, with the signature its card declares.

``verified_bytes`` reads the file once, hashes those bytes, checks the ONNX
graph's inputs and outputs against the card, and hands back the same bytes
for the session. A built-in model is built into the cache first; the pin is
the card's (in the package), so no file in the cache can change what runs.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from beamzoo.zoo.card import ModelCard, ModelIntegrityError

_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64"}
_checked: set[tuple] = set()  # (sha256, inputs, outputs) checked in this process
_lock = threading.Lock()


def verified_bytes(card: ModelCard) -> bytes:
    path = Path(card.file)
    if not path.exists() and card.build is not None:
        _build(card, path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelIntegrityError(f"model file for {card.ref} not found: {path}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != card.sha256:
        fix = ("delete it to have it built again" if card.build is not None
               else "put the right file there, or fix the card's sha256 if the model really changed")
        pinned_by = f"its card ({card.card_path}, field 'sha256')" if card.card_path else "its card"
        raise ModelIntegrityError(
            f"model file {path} for {card.ref} has sha256 {actual}, but {pinned_by} pins {card.sha256}: "
            f"the file is corrupt or not the model the card describes; {fix}")
    with _lock:
        key = (actual, card.inputs, card.outputs)
        if key not in _checked:
            check_signature(card, data)
            _checked.add(key)
    return data


def _build(card: ModelCard, target: Path) -> None:
    from beamzoo.zoo.builders import BUILDERS
    spec = card.build
    builder = BUILDERS.get(spec.get("builder"))
    if builder is None:
        raise ModelIntegrityError(f"{card.ref}: no builder named {spec.get('builder')!r}; known: "
                                  f"{', '.join(sorted(BUILDERS))}")
    data = builder(**(spec.get("args") or {}))
    built = hashlib.sha256(data).hexdigest()
    if built != card.sha256:
        raise ModelIntegrityError(f"building {card.ref} gave sha256 {built}, but its card pins {card.sha256}: "
                                  "the weights package or the builder changed")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def onnx_signature(data: bytes) -> tuple[dict, dict]:
    """The model's graph inputs (without initializers) and outputs: name -> (dtype, dims);
    a dim is an int, or None where the model leaves it free."""
    import onnx
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelIntegrityError(f"not an ONNX model: {exc}") from None
    inits = {i.name for i in model.graph.initializer}

    def sig(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out[v.name] = (_ONNX_TYPES.get(t.elem_type, f"onnx type {t.elem_type}"), dims)
        return out
    return sig(v for v in model.graph.input if v.name not in inits), sig(model.graph.output)


def check_signature(card: ModelCard, data: bytes) -> None:
    """Refuse a model whose inputs or outputs (names, dtypes, shapes) differ from its card."""
    from beamzoo.zoo.card import CardError
    inputs, outputs = onnx_signature(data)
    where = card.card_path or card.ref
    problems = []
    for kind, tensors, have in (("inputs", card.inputs, inputs), ("outputs", card.outputs, outputs)):
        for i, t in enumerate(tensors):
            at = f"{kind}[{i}]"
            if t.name not in have:
                problems.append((f"{at}.name", f"{t.name!r} is not in the model; its {kind}: "
                                               f"{', '.join(map(repr, have)) or 'none'}"))
                continue
            dtype, dims = have[t.name]
            if dtype != t.dtype:
                problems.append((f"{at}.dtype", f"{t.name!r} is {dtype} in the model, the card says {t.dtype}"))
            if not dims or dims[0] not in (None,):
                problems.append((f"{at}.shape", f"{t.name!r} has a fixed batch axis {dims[:1]} in the model; "
                                                "beamzoo batches rows: export it with a dynamic batch axis"))
                continue
            rest = dims[1:]
            if len(rest) != len(t.shape) or any(d is not None and s is not None and d != s
                                                for d, s in zip(rest, t.shape)):
                shown = ["batch", *("?" if d is None else d for d in rest)]
                problems.append((f"{at}.shape", f"{t.name!r} is {shown} in the model, the card says "
                                                f"{list(t.shape)} (without the batch axis)"))
    missing = sorted(set(inputs) - {t.name for t in card.inputs})
    if missing:
        problems.append(("inputs", f"the model also takes {', '.join(map(repr, missing))}, which the card "
                                   "does not list (every input must be fed)"))
    if problems:
        field_name, message = problems[0]
        more = "; ".join(m for _, m in problems[1:])
        raise CardError(where, field_name, "does not fit the ONNX file: " + message + (f"; also: {more}" if more else ""))

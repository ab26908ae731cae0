"""A model file is used only as the bytes its card pins, with the signature its card declares.

``verified_bytes`` reads the file once (a regular file under 2 GiB, its size
checked before it is opened), hashes those bytes as they are read, checks the
ONNX graph's inputs and outputs against the card, refuses tensors kept in
external files, and hands back the same bytes for the session. A built-in
model is built into the cache first; the pin is the card's (in the package),
so no file in the cache can change what runs. ``load_card`` also has
onnxruntime make a session of a user's model once, so that a model it cannot
run (custom operators, say) is refused when its card is loaded.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from beamzoo.zoo import files
from beamzoo.zoo.builders import BUILDERS
from beamzoo.zoo.card import CardError, ModelCard, ModelIntegrityError, read_card, shown

_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64"}
# Standard operator domains and those onnxruntime adds; a node of another domain is a custom operator.
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training", "com.microsoft",
                  "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc", "org.pytorch.aten"}
_checked: set[tuple] = set()  # (sha256, inputs, outputs) checked in this process
_loadable: set[str] = set()  # sha256 of models onnxruntime made a session of in this process
_lock = threading.Lock()


def verified_bytes(card: ModelCard) -> bytes:
    path = Path(card.file)
    if not path.exists() and card.build is not None:
        _build(card, path)
    h = hashlib.sha256()
    try:
        data = files.read(path, files.MODEL_MAX, h)
    except files.Refused as exc:
        where = f" (its card: {card.card_path}, field 'file')" if card.card_path else ""
        raise ModelIntegrityError(f"model file {path} for {card.ref} {exc}{where}") from None
    actual = h.hexdigest()
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


def check_loadable(card: ModelCard, data: bytes) -> None:
    """Have onnxruntime make a session of the model once per process; refuse, as a card error,
    a model it cannot load (custom operators, an opset it does not know)."""
    if card.sha256 in _loadable:
        return
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise not_loadable(card, data, exc) from None
    _loadable.add(card.sha256)


def not_loadable(card: ModelCard, data: bytes, exc: Exception) -> CardError:
    """The card error for a model onnxruntime refused with ``exc``: one line, with what to do."""
    import onnx
    import onnxruntime as ort
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 200 else reason[:199] + "…"
    try:
        model = onnx.load_model_from_string(data)
        local = {f.domain for f in model.functions}
        custom = sorted({n.domain for n in _nodes(model)} - _KNOWN_DOMAINS - local)
    except Exception:
        custom = []
    if custom:
        hint = (f"it uses operators of domain {', '.join(shown(d) for d in custom[:3])}, which onnxruntime does "
                "not know (custom operators): export the model with standard ONNX operators")
    else:
        hint = f"export the model again for an ONNX opset that onnxruntime {ort.__version__} runs"
    return CardError(card.card_path or card.ref, "file",
                     f"onnxruntime cannot load the model {card.file}: {reason}; {hint}")


def _graphs(model):
    """The model's graph, its subgraphs (of If, Loop, Scan) and its functions' nodes' subgraphs."""
    todo = [model.graph]
    while todo:
        g = todo.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                todo.extend([a.g] if a.HasField("g") else [])
                todo.extend(a.graphs)


def _nodes(model):
    for g in _graphs(model):
        yield from g.node
    for f in model.functions:
        yield from f.node


def _tensors(model):
    """Every tensor the model holds: initializers and constant attributes, subgraphs included."""
    for g in _graphs(model):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield from (s.values, s.indices)
    for node in _nodes(model):
        for a in node.attribute:
            yield from ([a.t] if a.HasField("t") else [])
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for s in a.sparse_tensors:
                yield from (s.values, s.indices)


def model_bytes(card: ModelCard) -> bytes:
    """The model file's bytes, once their sha256 is the card's pin and their signature the
    card's; a built-in model is built into the cache on first use. Make sessions from these
    bytes, never by opening the path again."""
    return verified_bytes(card)


def onnx_path(card: ModelCard) -> Path:
    """The model file, verified (for tools that need a path)."""
    verified_bytes(card)
    return Path(card.file)


def load_card(path: str | os.PathLike, builtin: bool = False, verify: bool = True,
              root: str | os.PathLike | None = None) -> ModelCard:
    """Read and check a card file (YAML or JSON); the files it names lie in ``root`` (default:
    the card's folder). A user's card is verified at once: its file's sha256, its signature
    against the ONNX file, and that onnxruntime can load it."""
    card = read_card(path, builtin=builtin, root=root)
    if verify and not builtin:
        check_loadable(card, verified_bytes(card))
    return card


def _build(card: ModelCard, target: Path) -> None:
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


def _model(data: bytes):
    import onnx
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelIntegrityError(f"not an ONNX model: {' '.join(str(exc).split())[:200]}") from None


def onnx_signature(data) -> tuple[dict, dict]:
    """The model's graph inputs (without initializers) and outputs: name -> (dtype, dims);
    a dim is an int, or None where the model leaves it free. ``data``: bytes, or a parsed model."""
    model = _model(data) if isinstance(data, bytes) else data
    inits = {i.name for i in model.graph.initializer}

    def sig(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None  # -1: free (Paddle)
                    for d in t.shape.dim]
            out[v.name] = (_ONNX_TYPES.get(t.elem_type, f"onnx type {t.elem_type}"), dims)
        return out
    return sig(v for v in model.graph.input if v.name not in inits), sig(model.graph.output)


def _names(names) -> str:
    names = list(names)
    return ", ".join(shown(n) for n in names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")


def check_signature(card: ModelCard, data: bytes) -> None:
    """Refuse a model whose inputs or outputs (names, dtypes, shapes) differ from its card, or
    that keeps tensors in external files (beamzoo loads a model from its one checked file)."""
    import onnx
    model = _model(data)
    where = card.card_path or card.ref
    external = next((t for t in _tensors(model)
                     if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)), None)
    if external is not None:
        raise CardError(where, "file", f"the model keeps tensor {shown(external.name)} in an external data "
                        "file; beamzoo loads a model from its one pinned file: save it whole, with "
                        "onnx.save_model(model, path, save_as_external_data=False)")
    inputs, outputs = onnx_signature(model)
    problems = []
    for kind, tensors, have in (("inputs", card.inputs, inputs), ("outputs", card.outputs, outputs)):
        for i, t in enumerate(tensors):
            at = f"{kind}[{i}]"
            name = shown(t.name)
            if t.name not in have:
                problems.append((f"{at}.name", f"{name} is not in the model; its {kind}: "
                                               f"{_names(have) or 'none'}"))
                continue
            dtype, dims = have[t.name]
            if dtype != t.dtype:
                problems.append((f"{at}.dtype", f"{name} is {dtype} in the model, the card says {t.dtype}"))
            if not dims or dims[0] not in (None,):
                problems.append((f"{at}.shape", f"{name} has a fixed batch axis {dims[:1]} in the model; "
                                                "beamzoo batches rows: export it with a dynamic batch axis"))
                continue
            rest = dims[1:]
            if len(rest) != len(t.shape) or any(d is not None and s is not None and d != s
                                                for d, s in zip(rest, t.shape)):
                dims_shown = shown(["batch", *("?" if d is None else d for d in rest)])
                problems.append((f"{at}.shape", f"{name} is {dims_shown} in the model, the card says "
                                                f"{shown(list(t.shape))} (without the batch axis)"))
    missing = sorted(set(inputs) - {t.name for t in card.inputs})
    if missing:
        problems.append(("inputs", f"the model also takes {_names(missing)}, which the card "
                                   "does not list (every input must be fed)"))
    if problems:
        field_name, message = problems[0]
        more = "; ".join(m for _, m in problems[1:4]) + ("; …" if len(problems) > 4 else "")
        raise CardError(where, field_name, "does not fit the ONNX file: " + message + (f"; also: {more}" if more else ""))

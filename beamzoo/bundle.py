"""A graph exported to a folder that runs on a device: ``beamzoo run DIR --input ... --output ...``.

    DIR/graph.json            the graph; inputs, outputs and model paths left as placeholders
    DIR/models/<sha256>.onnx  each model file, named by its hash
    DIR/bundle.lock           sha256 of graph.json and of every model file (written last)

``load`` checks the lock before anything else, so a changed or half-written
bundle is refused before any input is read. No Beam on this path.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from beamzoo.core import check_placement, op_class
from beamzoo.graph import FORMAT, Graph, Step, canonical
from beamzoo.transforms.io import is_remote
from beamzoo.zoo import ModelCard, sha256_of

LOCK, GRAPH, MODELS = "bundle.lock", "graph.json", "models"
INPUTS = {"files": "pattern", "manifest": "table"}  # source op -> the param ``input`` fills in
SINKS = ("parquet", "jsonl")


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or changed since it was exported."""


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sink_base(paths: list[str]) -> str:
    local = [p for p in paths if not is_remote(p)]
    return os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""


def export(graph: Graph, directory) -> Path:
    """Write ``graph`` and its model files to ``directory`` (new or empty); returns it."""
    from beamzoo import __version__
    d = Path(directory)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise BundleError(f"cannot export to {d}: it is not an empty folder; choose a new one")
    if sum(s.op in INPUTS for s in graph.steps) != 1:
        raise BundleError("a bundle reads one input: export a graph with exactly one files or manifest source")
    base = _sink_base([s.params["path"] for s in graph.steps if s.op in SINKS])
    (d / MODELS).mkdir(parents=True, exist_ok=True)
    models: dict[str, str] = {}  # relative path -> sha256
    steps = []
    for s in graph.steps:
        params = s.params
        if "model" in params:
            card = ModelCard.from_param(params["model"])
            expected = card.sha256
            rel = f"{MODELS}/{expected}.onnx"
            if rel not in models:
                _write(d / rel, card.model_bytes())  # the verified bytes themselves
                models[rel] = expected
            params["model"] = {**_portable(card.as_dict()), "file": rel}
        if s.op in INPUTS:
            params[INPUTS[s.op]] = ""
        if s.op in SINKS:
            p = params["path"]
            params["path"] = p.rstrip("/").rsplit("/", 1)[-1] if is_remote(p) else os.path.relpath(p, base)
        steps.append(Step(s.id, s.kind, s.op, canonical(params), s.inputs, s.placement))
    text = Graph(tuple(steps)).to_json().encode()
    _write(d / GRAPH, text)
    lock = {"beamzoo_bundle": 1, "beamzoo_version": __version__, "graph_format": FORMAT,
            "fingerprint": graph.fingerprint(), GRAPH: hashlib.sha256(text).hexdigest(),
            "models": models}
    _write(d / LOCK, (json.dumps(lock, sort_keys=True, indent=1) + "\n").encode())
    return d


def _portable(card: dict) -> dict:
    """A card as a bundle keeps it: no paths of the exporting machine, nothing to build."""
    return {k: v for k, v in card.items() if k not in ("card_path", "build")}


def _changed(d: Path, rel: str, got: str, pinned: str) -> BundleError:
    return BundleError(f"bundle {d} was changed: {rel} has sha256 {got}, its lock pins {pinned}; export it again")


def check(directory) -> dict:
    """The bundle's lock, once every file it pins is there with its pinned hash."""
    d = Path(directory)
    try:
        lock = json.loads((d / LOCK).read_text(encoding="utf-8"))
        pins = {GRAPH: lock[GRAPH], **lock["models"]}
    except FileNotFoundError:
        raise BundleError(f"{d} has no {LOCK}: it is not a bundle, or its export did not finish; "
                          "export it again") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {d} was changed: {LOCK} is not a bundle lock ({exc}); export it again") from None
    for rel, pinned in pins.items():
        if not (d / rel).is_file():
            raise BundleError(f"bundle {d} is incomplete: {rel} is missing (its lock pins sha256 {pinned}); "
                              "export it again")
        got = sha256_of(d / rel)
        if got != pinned:
            raise _changed(d, rel, got, pinned)
    extra = sorted(f"{MODELS}/{p.name}" for p in (d / MODELS).iterdir()
                   if f"{MODELS}/{p.name}" not in pins) if (d / MODELS).is_dir() else []
    if extra:
        raise BundleError(f"bundle {d} was changed: {extra[0]} is not in its lock; export it again")
    return lock


def load(directory, input: str, output: str, derived_only: bool = False) -> Graph:
    """The bundle's graph reading ``input`` and writing below ``output``, after checking its lock."""
    d = Path(directory).absolute()
    lock = check(d)
    data = json.loads((d / GRAPH).read_text(encoding="utf-8"))
    if not is_remote(output):
        output = os.path.abspath(output)
    steps = []
    try:
        for s in data["steps"]:
            params = dict(s.get("params", {}))
            if isinstance(params.get("model"), dict):
                rel = params["model"]["file"]
                if lock["models"].get(rel) != params["model"]["sha256"]:
                    raise BundleError(f"bundle {d} was changed: step {s['id']!r} of {GRAPH} pins {rel} at sha256 "
                                      f"{params['model']['sha256']}, its lock pins {lock['models'].get(rel)}; "
                                      "export it again")
                params["model"] = {**params["model"], "file": str(d / rel)}
            if s["op"] in INPUTS:
                params[INPUTS[s["op"]]] = input
            if s["op"] in SINKS:
                params["path"] = os.path.join(output, params["path"])
                params["derived_only"] = bool(derived_only or params.get("derived_only"))
            op = op_class(s["op"]).from_params(params, id=s["id"])  # normalises paths as the API does
            steps.append(Step(s["id"], s["kind"], s["op"], canonical(op.params), tuple(s.get("inputs", ())),
                              tuple(check_placement(s["id"], s.get("placement") or {}).items())))
        return Graph(tuple(steps))
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {d} (exported by beamzoo {lock.get('beamzoo_version')}) does not load here: "
                          f"{type(exc).__name__}: {exc}") from None

"""A graph exported to a folder that runs on a device: ``beamzoo run DIR --input ... --output ...``.

    DIR/graph.json            the graph; inputs, outputs and model paths left as placeholders
    DIR/models/<sha256>.onnx  each model file, named by its hash
    DIR/bundle.sig            with ``sign``: an Ed25519 signature of bundle.lock
    DIR/bundle.lock           sha256 of graph.json and of every model file (written last)

``load`` checks the lock before anything else, so a changed or half-written
bundle is refused before any input is read; with ``trust`` it first checks that
the lock is signed by a trusted key. A bundle names only its own files: its
models are regular files ``models/<sha256>.onnx`` of its own folder and its
sinks write below the run's output. The lock and the graph are read with a
bounded size and nesting. No Beam on this path.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from beamzoo.core.graph import FORMAT, Graph, Group, Step, canonical
from beamzoo.core.knobs import Knob
from beamzoo.core.op import Operator, check_placement
from beamzoo.core.registry import op_class
from beamzoo.transforms.io import is_remote
from beamzoo.transforms.sinks import FileSink
from beamzoo.version import __version__
from beamzoo.zoo import card_of, model_bytes

LOCK, GRAPH, MODELS, SIGNATURE = "bundle.lock", "graph.json", "models", "bundle.sig"
MAX_BYTES = {LOCK: 1 << 20, GRAPH: 16 << 20, SIGNATURE: 4 << 10}  # read no more than this
MAX_KEY_BYTES = 64 << 10
MAX_DEPTH = 64  # JSON nesting; an exported graph nests about 8 deep
MODEL_FILE = re.compile(r"models/[0-9a-f]{64}\.onnx")
SHA256 = re.compile(r"[0-9a-f]{64}")
SIGNED = b"beamzoo bundle.lock 1\n"  # what a signature covers: this, then the lock's bytes

EXPORT = {"sign": Knob(None, str, results=False,
                       doc="sign the bundle with this Ed25519 private key (PREFIX.key of `beamzoo keys new`); "
                           "`beamzoo run DIR --trust PREFIX.pub` then runs it only as signed")}


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, changed since it was exported, or not signed as trusted."""


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...'"


def _input_knob(op: type[Operator]) -> str | None:
    """The knob a bundle's input fills in (a source's ``input_knob``)."""
    return getattr(op, "input_knob", None) if op.kind == "source" else None


def _file_sink(op: type[Operator]) -> bool:
    """A sink that writes files below the run's output (not one that hands rows back)."""
    return issubclass(op, FileSink)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- keys and signatures

def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """sha256 of the raw public key: how errors and ``bundle.sig`` name a key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)).hexdigest()


def new_keys(where) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``PREFIX.key`` (PKCS#8 PEM, unencrypted, mode 0600) and ``PREFIX.pub``
    (SubjectPublicKeyInfo PEM); ``where`` is the prefix, or a folder for ``DIR/bundle.key`` and
    ``DIR/bundle.pub``. Existing files are never overwritten."""
    base = Path(where)
    if base.is_dir() or str(where).endswith(("/", os.sep)):
        base = base / "bundle"
    private, public = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    for p in (private, public):
        if os.path.lexists(p):
            raise BundleError(f"{p} already exists: choose another prefix (keys are never overwritten)")
    base.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with open(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(pem)
    with open(os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _key_file(path, kind: str):
    limit = MAX_KEY_BYTES
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BundleError(f"the {kind} key {path} is not a file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"cannot read the {kind} key {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise BundleError(f"the {kind} key {path} is over {limit} bytes: it is not a key file")
    try:
        key = (serialization.load_pem_private_key(data, password=None) if kind == "private"
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        made = "PREFIX.key" if kind == "private" else "PREFIX.pub"
        raise BundleError(f"{path} is not an unencrypted Ed25519 {kind} key in PEM ({made} of `beamzoo keys new`): "
                          f"{_short(str(exc))}") from None
    want = Ed25519PrivateKey if kind == "private" else Ed25519PublicKey
    if not isinstance(key, want):
        raise BundleError(f"{path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 {kind} key: "
                          "make one with `beamzoo keys new PREFIX`")
    return key


def private_key(path) -> Ed25519PrivateKey:
    """The private key of a ``PREFIX.key`` file (``new_keys``)."""
    return _key_file(path, "private")


def public_key(path) -> Ed25519PublicKey:
    """The public key of a ``PREFIX.pub`` file (``new_keys``)."""
    return _key_file(path, "public")


def _signature(lock: bytes, key: Ed25519PrivateKey) -> bytes:
    sig = {"beamzoo_signature": 1, "algorithm": "ed25519", "key": key_id(key),
           "signature": base64.b64encode(key.sign(SIGNED + lock)).decode()}
    return (json.dumps(sig, sort_keys=True, indent=1) + "\n").encode()


def _verify(d: Path, lock: bytes, trust: list[Ed25519PublicKey]) -> None:
    """Refuses the lock unless ``bundle.sig`` is a valid signature of it by one of ``trust``."""
    trusted = {key_id(k): k for k in trust}
    try:
        sig = _json(d, SIGNATURE, _read(d, SIGNATURE))
    except FileNotFoundError:
        raise BundleError(f"bundle {d} is not signed (it has no {SIGNATURE}), and --trust runs only signed "
                          "bundles: export it with --sign KEY") from None
    if (not isinstance(sig, dict) or sig.get("algorithm") != "ed25519" or not isinstance(sig.get("key"), str)
            or not SHA256.fullmatch(sig["key"])):
        raise BundleError(f"bundle {d}: {SIGNATURE} is not an Ed25519 bundle signature; export and sign it again")
    key = trusted.get(sig["key"])
    if key is None:
        raise BundleError(f"bundle {d} is signed by key {sig['key'][:16]}, which is not trusted here "
                          f"(--trust: {', '.join(k[:16] for k in trusted)}); run only bundles signed by a key "
                          "you trust")
    try:
        key.verify(base64.b64decode(sig.get("signature"), validate=True), SIGNED + lock)
    except (InvalidSignature, ValueError, TypeError):
        raise BundleError(f"bundle {d} was changed after it was signed: {SIGNATURE} does not verify {LOCK} "
                          f"with key {sig['key'][:16]}; export and sign it again") from None


# ---------------------------------------------------------------- export

def _sink_base(paths: list[str]) -> str:
    local = [p for p in paths if not is_remote(p)]
    return os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""


def export(graph: Graph, directory, sign: Ed25519PrivateKey | str | os.PathLike | None = None) -> Path:
    """Write ``graph`` and its model files to ``directory`` (new or empty); returns it. The
    steps' traits say what to rewrite: a source's input knob is left for ``beamzoo run``
    to fill in, file sinks' paths become relative to the output, model knobs name the
    bundled files. ``sign``: a private key (or its file) that signs the lock."""
    d = Path(directory)
    if sign is not None and not isinstance(sign, Ed25519PrivateKey):
        sign = private_key(sign)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise BundleError(f"cannot export to {d}: it is not an empty folder; choose a new one")
    classes = {s.id: op_class(s.op) for s in graph.steps}
    following = [s.id for s in graph.steps if s.operator().one_process()]
    if following:
        raise BundleError(f"step {following[0]!r} follows its model's newest version (model_refresh); a bundle "
                          "runs the models it carries: export the graph without model_refresh")
    if sum(_input_knob(c) is not None for c in classes.values()) != 1:
        raise BundleError("a bundle reads one input: export a graph with exactly one files or manifest source")
    base = _sink_base([s.params["path"] for s in graph.steps if _file_sink(classes[s.id])])
    (d / MODELS).mkdir(parents=True, exist_ok=True)
    models: dict[str, str] = {}  # relative path -> sha256
    steps = []
    for s in graph.steps:
        cls, params = classes[s.id], s.params
        for name in cls.model_knobs():
            card = card_of(params[name])
            rel = f"{MODELS}/{card.sha256}.onnx"
            if rel not in models:
                _write(d / rel, model_bytes(card))  # the verified bytes themselves
                models[rel] = card.sha256
            params[name] = {**_portable(card.as_dict()), "file": rel}
        if _input_knob(cls) is not None:
            params[_input_knob(cls)] = ""
        if _file_sink(cls):
            p = params["path"]
            params["path"] = p.rstrip("/").rsplit("/", 1)[-1] if is_remote(p) else os.path.relpath(p, base)
        steps.append(Step(s.id, s.kind, s.op, canonical(params), s.inputs, s.placement))
    text = Graph(tuple(steps), graph.groups).to_json().encode()
    _write(d / GRAPH, text)
    lock = {"beamzoo_bundle": 1, "beamzoo_version": __version__, "graph_format": FORMAT,
            "fingerprint": graph.fingerprint(), GRAPH: hashlib.sha256(text).hexdigest(),
            "models": models}
    lock_bytes = (json.dumps(lock, sort_keys=True, indent=1) + "\n").encode()
    if sign is not None:
        _write(d / SIGNATURE, _signature(lock_bytes, sign))
    _write(d / LOCK, lock_bytes)
    return d


def _portable(card: dict) -> dict:
    """A card as a bundle keeps it: no paths of the exporting machine, nothing to build."""
    return {k: v for k, v in card.items() if k not in ("card_path", "build")}


# ---------------------------------------------------------------- reading a bundle

def _open_regular(path: Path, name: str):
    """``path`` opened for reading: a regular file, not a symbolic link (FileNotFoundError if absent)."""
    try:  # not following a link, and not waiting on a pipe
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
        raise BundleError(f"{name} {why}: a bundle's files are regular files in its own folder") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise BundleError(f"{name} is not a regular file: a bundle's files are regular files in its own folder")
    return f


def _read_regular(path: Path, limit: int, name: str) -> bytes:
    with _open_regular(path, name) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:
            raise BundleError(f"{name} is {max(size, len(data))} bytes, more than the {limit} it may have")
    return data


def _read(d: Path, rel: str) -> bytes:
    try:
        return _read_regular(d / rel, MAX_BYTES[rel], rel)
    except BundleError as exc:
        raise BundleError(f"bundle {d}: {exc}; export it again") from None


def _hash(d: Path, rel: str) -> str:
    h = hashlib.sha256()
    try:
        with _open_regular(d / rel, rel) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except BundleError as exc:
        raise BundleError(f"bundle {d}: {exc}; export it again") from None
    return h.hexdigest()


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 / -1 as int8


def json_depth(data: bytes) -> int:
    """How deep JSON text nests, counted without parsing it (brackets inside strings left out)."""
    brackets = _STRING.sub(b"", data).translate(None, _BRACKETS).translate(_STEP)
    return int(np.cumsum(np.frombuffer(brackets, np.int8), dtype=np.int64).max(initial=0))


def _json(d: Path, rel: str, data: bytes):
    depth = json_depth(data)
    if depth > MAX_DEPTH:
        raise BundleError(f"bundle {d}: {rel} nests {depth} levels deep, more than the {MAX_DEPTH} a bundle "
                          "may; export it again")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"bundle {d} was changed: {rel} is not JSON ({_short(str(exc))}); export it again") from None


def _lock_field(d: Path, name: str, value, want: str) -> BundleError:
    return BundleError(f"bundle {d}: {LOCK} field {name} {want}, got {_short(value)}; export it again")


def _pins(d: Path, lock) -> dict[str, str]:
    """The files a lock pins (relative path -> sha256), each a file the bundle may name."""
    if not isinstance(lock, dict):
        raise _lock_field(d, "(the whole lock)", type(lock).__name__, "must be an object")
    if not isinstance(lock.get(GRAPH), str) or not SHA256.fullmatch(lock[GRAPH]):
        raise _lock_field(d, repr(GRAPH), lock.get(GRAPH), "must be a sha256 (64 hex digits)")
    models = lock.get("models")
    if not isinstance(models, dict):
        raise _lock_field(d, "'models'", models, "must be an object {models/<sha256>.onnx: sha256}")
    for rel, pin in models.items():
        if not MODEL_FILE.fullmatch(rel):
            raise _lock_field(d, "'models'", rel, "names only files models/<sha256>.onnx of the bundle's own folder")
        if not isinstance(pin, str) or not SHA256.fullmatch(pin):
            raise _lock_field(d, f"'models' {rel!r}", pin, "must be a sha256 (64 hex digits)")
    return {GRAPH: lock[GRAPH], **models}


def _changed(d: Path, rel: str, got: str, pinned: str) -> BundleError:
    return BundleError(f"bundle {d} was changed: {rel} has sha256 {got}, its lock pins {pinned}; export it again")


def _verified(d: Path, trust=()) -> tuple[dict, bytes]:
    """The lock and the graph's bytes, once the lock is signed by one of ``trust`` (when given)
    and every file it pins is there with its pinned hash."""
    try:
        lock_bytes = _read(d, LOCK)
    except FileNotFoundError:
        raise BundleError(f"{d} has no {LOCK}: it is not a bundle, or its export did not finish; "
                          "export it again") from None
    if trust:
        _verify(d, lock_bytes, [k if isinstance(k, Ed25519PublicKey) else public_key(k) for k in trust])
    lock = _json(d, LOCK, lock_bytes)
    pins = _pins(d, lock)
    models = _lstat_mode(d / MODELS)
    if models and not stat.S_ISDIR(models):
        raise BundleError(f"bundle {d}: {MODELS} is not a folder of the bundle (a symbolic link or a file); "
                          "export it again")
    graph = b""
    for rel, pinned in pins.items():
        try:
            if rel == GRAPH:
                graph = _read(d, GRAPH)
                got = hashlib.sha256(graph).hexdigest()
            else:
                got = _hash(d, rel)
        except FileNotFoundError:
            raise BundleError(f"bundle {d} is incomplete: {rel} is missing (its lock pins sha256 {pinned}); "
                              "export it again") from None
        if got != pinned:
            raise _changed(d, rel, got, pinned)
    extra = sorted(f"{MODELS}/{p.name}" for p in (d / MODELS).iterdir()
                   if f"{MODELS}/{p.name}" not in pins) if models else []
    if extra:
        raise BundleError(f"bundle {d} was changed: {_short(extra[0])} is not in its lock; export it again")
    return lock, graph


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def check(directory, trust=()) -> dict:
    """The bundle's lock, once it is signed by one of ``trust`` (public keys or their files;
    none: not checked) and every file it pins is there with its pinned hash."""
    return _verified(Path(directory), trust)[0]


def _sink_path(d: Path, step: str, path) -> str:
    """A sink's path as a bundle holds it: relative, and below the output."""
    norm = os.path.normpath(path) if isinstance(path, str) and path else ""
    if norm in ("", ".") or os.path.isabs(norm) or norm == ".." or norm.startswith("../") or "://" in path:
        raise BundleError(f"bundle {d}: {GRAPH} step {step!r} field 'path' is {_short(path)}: a sink writes below "
                          "--output, so a bundle names it relative to the output without leading out of it; "
                          "export it again")
    return norm


def _model(d: Path, lock: dict, step: str, name: str, card) -> dict:
    """A model knob's card, its file the bundle's own, pinned by the lock."""
    rel = card.get("file") if isinstance(card, dict) else None
    if not isinstance(rel, str) or rel not in lock["models"]:
        raise BundleError(f"bundle {d}: {GRAPH} step {step!r} field {name!r} names {_short(rel or card)}: a bundle's "
                          f"models are the files of its {MODELS}/ that its lock pins; export it again")
    pin = card.get("sha256")
    if lock["models"][rel] != pin:
        raise BundleError(f"bundle {d} was changed: step {step!r} of {GRAPH} pins {rel} at sha256 "
                          f"{pin if isinstance(pin, str) and SHA256.fullmatch(pin) else _short(pin)}, "
                          f"its lock pins {lock['models'][rel]}; export it again")
    return {**card, "file": str(d / rel)}


def load(directory, input: str, output: str, derived_only: bool = False, trust=()) -> Graph:
    """The bundle's graph reading ``input`` and writing below ``output``, after checking its lock
    (and, with ``trust``, that one of those public keys signed it)."""
    d = Path(directory).absolute()
    lock, text = _verified(d, trust)
    data = _json(d, GRAPH, text)
    if not is_remote(output):
        output = os.path.abspath(output)
    steps = []
    try:
        for s in data["steps"]:
            cls = op_class(s["op"])
            params = dict(s.get("params", {}))
            for name in cls.model_knobs():
                params[name] = _model(d, lock, s["id"], name, params.get(name))
            knob = _input_knob(cls)
            if knob is not None:
                params[knob] = cls.knobs[knob].given(cls.__name__, knob, input)  # a path made absolute
            if _file_sink(cls):
                params["path"] = os.path.join(output, _sink_path(d, s["id"], params.get("path")))
                params["derived_only"] = bool(derived_only or params.get("derived_only"))
            op = cls.from_params(params, id=s["id"])
            steps.append(Step(s["id"], s["kind"], s["op"], canonical(op.params), tuple(s.get("inputs", ())),
                              tuple(check_placement(s["id"], s.get("placement") or {}).items())))
        return Graph(tuple(steps), tuple(Group.from_dict(g) for g in data.get("groups", ())))
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"bundle {d} (exported by beamzoo {_short(lock.get('beamzoo_version'))}) does not load "
                          f"here: {type(exc).__name__}: {_short(str(exc), 300)}") from None

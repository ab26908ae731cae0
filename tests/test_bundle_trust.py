"""Signed bundles: ``beamzoo keys new``, ``--export DIR --sign KEY``, ``beamzoo run DIR --trust PUBKEY``."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beamzoo.bundle import BundleError, export, load, new_keys, private_key, public_key
from beamzoo.pipeline import score_images
from conftest import ROOT, error_line
from test_bundle import touched, trap

def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beamzoo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def score(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress",
                           *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: ``release`` signs, ``other`` is someone else's."""
    return {name: new_keys(tmp_path / "keys" / name) for name in ("release", "other")}


@pytest.fixture
def signed(tiny_model, colour_dir, tmp_path, keys):
    graph = score_images(str(colour_dir), str(tmp_path / "original"), tiny_model, topk=2)
    return export(graph, tmp_path / "bundle", sign=keys["release"][0])


def test_keys_new_sign_and_trust_round_trip_through_the_command_lines(tmp_path, tiny_model, colour_dir):
    made = cli("keys", "new", tmp_path / "keys" / "release")
    assert made.returncode == 0, made.stderr
    key, pub = tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert f"--trust {pub}" in made.stdout and f"--sign {key}" in made.stdout
    first = key.read_bytes()
    again = cli("keys", "new", tmp_path / "keys" / "release")
    assert again.returncode == 2 and "release.key already exists" in error_line(again.stderr)
    assert key.read_bytes() == first  # never overwritten

    card = tmp_path / "card" / "card.yaml"
    card.parent.mkdir()
    (card.parent / "tiny.onnx").write_bytes(Path(tiny_model.file).read_bytes())
    body = {k: v for k, v in tiny_model.as_dict().items() if k not in ("card_path", "build")}
    card.write_text(yaml.safe_dump({**body, "file": "tiny.onnx", "labels": list(tiny_model.labels)}))
    bundle = tmp_path / "bundle"
    exported = score("--export", bundle, "--sign", key, "--model", card, "--topk", "2")
    assert exported.returncode == 0, exported.stderr
    assert "signed" in exported.stdout and "--trust PUBKEY" in exported.stdout
    twice = score("--export", bundle, "--sign", key, "--model", card)
    assert twice.returncode == 2 and "is not an empty folder" in error_line(twice.stderr), twice.stderr
    # the signed lock pins every file of the bundle, the graph too
    lock = json.loads((bundle / "bundle.lock").read_text())
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert files - {"bundle.lock", "bundle.sig"} == {"graph.json", *lock["models"]}
    assert lock["graph.json"] == sha(bundle / "graph.json")
    assert all(lock["models"][m] == sha(bundle / m) for m in lock["models"])

    out = tmp_path / "out"
    ran = cli("run", bundle, "--trust", pub, "--input", colour_dir, "--output", out, "--no_progress")
    assert ran.returncode == 0, ran.stderr
    assert "inputs: 9  scored: 9  dead letters: 0" in ran.stdout


def test_a_signed_bundle_loads_with_its_key_among_the_trusted(signed, keys, colour_dir, tmp_path):
    release, other = public_key(keys["release"][1]), public_key(keys["other"][1])
    graph = load(signed, str(colour_dir), str(tmp_path / "out"), trust=[other, release])
    assert graph.step("files").params["pattern"] == str(colour_dir)
    with pytest.raises(BundleError, match="which is not trusted here"):
        load(signed, str(colour_dir), str(tmp_path / "out"), trust=[other])


def _lock(bundle: Path) -> str:
    path = bundle / "bundle.lock"
    path.write_text(path.read_text().replace('"beamzoo_version": "', '"beamzoo_version": "9'))
    return "was changed after it was signed: bundle.sig does not verify bundle.lock"


def _graph_and_lock(bundle: Path) -> str:
    """A forger who changes the graph and fixes its hash in the lock."""
    path = bundle / "graph.json"
    path.write_text(path.read_text().replace('"k": 2', '"k": 3'))
    lock = json.loads((bundle / "bundle.lock").read_text())
    (bundle / "bundle.lock").write_text(json.dumps({**lock, "graph.json": sha(path)}, sort_keys=True, indent=1) + "\n")
    return "was changed after it was signed"


def _graph(bundle: Path) -> str:
    path = bundle / "graph.json"
    path.write_text(path.read_text().replace('"k": 2', '"k": 3'))
    return f"was changed: graph.json has sha256 {sha(path)}"


def _model(bundle: Path) -> str:
    (path,) = (bundle / "models").iterdir()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return f"was changed: models/{path.name} has sha256 {sha(path)}"


def _model_and_lock(bundle: Path) -> str:
    _model(bundle)
    (path,) = (bundle / "models").iterdir()
    lock = json.loads((bundle / "bundle.lock").read_text())
    lock["models"] = {f"models/{path.name}": sha(path)}
    (bundle / "bundle.lock").write_text(json.dumps(lock, sort_keys=True, indent=1) + "\n")
    return "was changed after it was signed"


def _unsigned(bundle: Path) -> str:
    (bundle / "bundle.sig").unlink()
    return "is not signed (it has no bundle.sig), and --trust runs only signed bundles"


def _resigned(bundle: Path) -> str:
    """A forger who changes the lock and signs it again, with a key of their own."""
    _graph_and_lock(bundle)
    key = private_key(bundle.parent / "keys" / "other.key")
    lock = (bundle / "bundle.lock").read_bytes()
    from beamzoo.bundle import SIGNED, key_id
    sig = {"algorithm": "ed25519", "beamzoo_signature": 1, "key": key_id(key),
           "signature": base64.b64encode(key.sign(SIGNED + lock)).decode()}
    (bundle / "bundle.sig").write_text(json.dumps(sig))
    return f"is signed by key {key_id(key)[:16]}, which is not trusted here"


def _signature_key_swapped(bundle: Path) -> str:
    """The signature file naming the trusted key over a signature it did not make."""
    sig = json.loads((bundle / "bundle.sig").read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[0] ^= 0x01
    (bundle / "bundle.sig").write_text(json.dumps({**sig, "signature": base64.b64encode(bytes(raw)).decode()}))
    return "was changed after it was signed"


@pytest.mark.parametrize("change", [_lock, _graph_and_lock, _graph, _model, _model_and_lock, _unsigned, _resigned,
                                    _signature_key_swapped],
                         ids=["lock", "graph and lock", "graph", "model", "model and lock", "unsigned",
                              "signed by another key", "signature bytes"])
def test_trust_refuses_a_bundle_changed_after_signing(signed, keys, colour_dir, tmp_path, change):
    message = change(signed)
    out = tmp_path / "out"
    before = trap(colour_dir)
    r = cli("run", signed, "--trust", keys["release"][1], "--input", colour_dir, "--output", out, "--no_progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    line = error_line(r.stderr)
    assert line.startswith(f"error: bundle {signed}") and message in line, line
    assert not out.exists()
    assert touched(before) == set(), "inputs were read although the bundle was refused"


def test_an_intact_bundle_signed_by_another_key_is_refused_before_its_graph_is_read(signed, keys, colour_dir,
                                                                                     tmp_path):
    before = trap(signed)
    r = cli("run", signed, "--trust", keys["other"][1], "--input", colour_dir, "--output", tmp_path / "out")
    assert r.returncode == 2, r
    assert "which is not trusted here" in error_line(r.stderr)
    assert touched(before) <= {str(signed), str(signed / "bundle.lock"), str(signed / "bundle.sig")}
    assert {str(signed / "graph.json")} | {str(p) for p in (signed / "models").iterdir()} <= set(before)


def test_without_trust_a_signed_bundle_runs_on_its_lock_alone(signed, colour_dir, tmp_path):
    r = cli("run", signed, "--input", colour_dir, "--output", tmp_path / "out", "--no_progress")
    assert r.returncode == 0 and "scored: 9" in r.stdout, r.stderr


@pytest.mark.parametrize("which, message", [
    ("missing", "--trust: cannot read the public key"),
    ("private", "--trust: .* is not an unencrypted Ed25519 public key in PEM"),
])
def test_a_bad_trust_file_is_one_error_line(signed, keys, colour_dir, tmp_path, which, message):
    path = tmp_path / "nope.pub" if which == "missing" else keys["release"][0]
    r = cli("run", signed, "--trust", path, "--input", colour_dir, "--output", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert re.search(message, error_line(r.stderr)), r.stderr


def _parse():
    path = os.path.join(ROOT, "pipelines", "score_images.py")
    spec = importlib.util.spec_from_file_location("score_images_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse


@pytest.mark.parametrize("argv, message", [
    (["--output", "/tmp/never", "--sign", "KEY"], "--sign signs a bundle: give it with --export DIR"),
    (["--export", "/tmp/never", "--sign", "PUB"], "--sign: .* is not an unencrypted Ed25519 private key"),
    (["--export", "/tmp/never", "--sign", "/nonexistent/x.key"], "--sign: cannot read the private key"),
])
def test_score_images_refuses_a_bad_sign_key_when_parsing(keys, capsys, argv, message):
    argv = [{"KEY": str(keys["release"][0]), "PUB": str(keys["release"][1])}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        _parse()(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, error_line(err)), err
    assert not os.path.exists("/tmp/never")


def test_keys_new_in_a_folder_writes_bundle_key_and_pub(tmp_path):
    (tmp_path / "k").mkdir()
    r = cli("keys", "new", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "k")) == ["bundle.key", "bundle.pub"]
    public_key(tmp_path / "k" / "bundle.pub")  # it reads back
    r = cli("keys", "--help")
    assert r.returncode == 0 and "--sign" in r.stdout and "--trust" in r.stdout


def test_the_server_serves_a_bundle_only_as_signed_with_trust(signed, keys, tmp_path):
    from beamzoo.serve.models import Servable
    assert Servable.from_bundle(signed, [public_key(keys["release"][1])]).name  # the key it was signed with
    refused = cli("serve", "--bundle", signed, "--trust", keys["other"][1], "--port", "0")
    assert refused.returncode == 2 and "not trusted" in error_line(refused.stderr)
    alone = cli("serve", "--model", "efficientnet_lite0", "--trust", keys["release"][1], "--port", "0")
    assert alone.returncode == 2 and "--trust checks bundles" in error_line(alone.stderr)

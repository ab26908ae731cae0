"""The README's own-API examples run as written: in a folder with ``photos/`` of real photographs,
and the remote tier's hosts answered by real servers on free ports of 127.0.0.1."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beamzoo.samples import sample_files
from conftest import ROOT, read

README = Path(ROOT) / "README.md"


def python_block(containing: str) -> str:
    """The README's first ```python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if containing in b]
    assert found, f"no python block of the README contains {containing!r}"
    return found[0]


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos" / "album"
    d.mkdir(parents=True)
    for p in sample_files():
        if p.suffix == ".jpg":
            shutil.copyfile(p, tmp_path / "photos" / p.name)
            shutil.copyfile(p, d / p.name)
    return tmp_path


def run_block(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    script = cwd / "example.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.slow
def test_the_own_api_example_runs_as_written(photos):
    code = python_block('p.run(["--runner=EdgeRunner"])\nprint(stats.line())')
    done = run_block(code, photos)
    assert done.returncode == 0, done.stderr[-3000:]
    jpgs = len(list((photos / "photos").rglob("*.jpg")))
    assert f"inputs: {jpgs}  scored: {jpgs}  dead letters: 0" in done.stdout
    assert len(read(photos / "out")) == jpgs


@pytest.mark.slow
def test_the_remote_tier_example_runs_as_written(photos):
    from beamzoo.serve.models import Servable
    from beamzoo.serve.server import Server
    code = python_block("RemoteClassify([")
    hosts = re.findall(r"http://[a-z-]+:8501", code)
    assert hosts == ["http://cloud-a:8501", "http://cloud-b:8501"]
    servers = [Server([Servable.from_model("efficientnet_lite0")], workers=1).start() for _ in hosts]
    try:
        for host, server in zip(hosts, servers):
            code = code.replace(host, server.url)  # hosts substituted, nothing else
        done = run_block(code, photos)
    finally:
        for s in servers:
            s.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read(photos / "out")
    top = len(list((photos / "photos").glob("*.jpg")))
    assert len(rows) == top
    escalated = [r for r in rows if r.get("cloud_endpoint")]
    assert escalated and {r["cloud_endpoint"] for r in escalated} <= {s.url for s in servers}
    assert all(r["cloud_label"] == r["label"] for r in escalated)  # the same model answered, remotely


def test_the_readme_shows_classify_beam_py_as_it_is():
    text = README.read_text(encoding="utf-8")
    shown = text.split("`pipelines/classify_beam.py`, in full:\n\n```python\n", 1)[1].split("```", 1)[0]
    assert shown == (Path(ROOT) / "pipelines" / "classify_beam.py").read_text(encoding="utf-8")

"""A venv of serving clients that cannot share the project's venv, made on first use.

The KServe Python SDK pins pandas<3 and psutil<6 and pulls in uvloop (which
would change the loop uvicorn runs on), so it lives in
``cache_dir()/clients-venv``. The venv is keyed by ``REQUIREMENTS``: a
different pin rebuilds it. ``python tests/clients_venv.py`` makes it and says
how long that took.
"""
from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import sys
import time
from pathlib import Path

from beamzoo.zoo import cache_dir

REQUIREMENTS = "kserve==0.21.0"
STAMP = "beamzoo-requirements.txt"  # written last: a venv without it is half made


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index."""


def venv_dir() -> Path:
    return cache_dir() / "clients-venv"


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure(requirements: str = REQUIREMENTS, venv: Path | None = None) -> tuple[Path, float | None]:
    """(the venv's python, seconds spent making it, or None when it was there already).
    Raises ``IndexUnreachable`` when pip cannot reach the index, ``RuntimeError`` when pip fails otherwise."""
    venv = venv or venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.parent / (venv.name + ".lock")):
        stamp = venv / STAMP
        if stamp.exists() and stamp.read_text() == requirements and python_of(venv).exists():
            return python_of(venv), None
        t0 = time.perf_counter()
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        py = str(python_of(venv))
        done = subprocess.run([py, "-m", "pip", "install", "--no-input", *requirements.split()],
                              capture_output=True, text=True)
        if done.returncode != 0:
            probe = subprocess.run([py, "-m", "pip", "index", "versions", requirements.split()[0].split("=")[0]],
                                   capture_output=True, text=True)
            tail = (done.stdout + done.stderr)[-2000:]
            if probe.returncode != 0:
                why = (probe.stdout + probe.stderr).strip().splitlines()[-1:] or ["no output"]
                raise IndexUnreachable(f"pip cannot reach the package index to install {requirements!r} "
                                       f"(pip index versions: {why[0][:200]})")
            raise RuntimeError(f"pip install {requirements} failed in {venv}:\n{tail}")
        stamp.write_text(requirements)
        return python_of(venv), time.perf_counter() - t0


@contextlib.contextmanager
def _locked(path: Path):
    """One maker of the venv at a time (other test runs may want it too)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
    py, seconds = ensure()
    print(f"{py}: " + (f"made in {seconds:.0f} s" if seconds is not None else "there already"))

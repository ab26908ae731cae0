"""PP-OCR models from the PyPI wheel ``rapidocr-onnxruntime`` 1.4.4 (Apache-2.0).

The wheel is fetched once with ``pip download --no-deps`` into the cache
(installing it would pull in ``opencv-python``, which clashes with the
headless OpenCV beamzoo uses), checked against its pinned sha256, and each
ONNX file is read out of it and checked against its own pin. After the first
download everything is offline. The recognizer's character dictionary is in
its ONNX metadata (key ``character``, one character a line), so the model's
pin covers it too.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from beamzoo.zoo.card import cache_dir

WHEEL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
REQUIREMENT = "rapidocr-onnxruntime==1.4.4"

# file in the wheel's rapidocr_onnxruntime/models/ -> its sha256
FILES = {
    "ch_PP-OCRv4_det_infer.onnx": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ch_PP-OCRv4_rec_infer.onnx": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
}


class RapidOcrWheelError(RuntimeError):
    """The wheel could not be fetched, or it or a file in it is not the pinned one."""


def wheel_dir() -> Path:
    return cache_dir() / "wheels"


def wheel_path() -> Path:
    """The verified wheel, downloaded from PyPI on first use."""
    path = wheel_dir() / WHEEL
    if not path.exists():
        _download(path.parent)
    actual = _sha256(path.read_bytes())
    if actual != WHEEL_SHA256:
        raise RapidOcrWheelError(f"{path} has sha256 {actual}, not the pinned {WHEEL_SHA256}; "
                                 "delete it to download it again")
    return path


def _download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--only-binary=:all:",
           "-d", str(dest), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (dest / WHEEL).exists():
        raise RapidOcrWheelError(f"could not download {REQUIREMENT} from PyPI into {dest} "
                                 f"({' '.join(cmd)}): {done.stderr.strip()[-500:]}")


def build_rapidocr(file: str) -> bytes:
    """The bytes of ``file`` (one of ``FILES``) from the wheel, verified by its pin."""
    if file not in FILES:
        raise ValueError(f"no model {file!r} in {WHEEL}; it has {', '.join(sorted(FILES))}")
    with zipfile.ZipFile(wheel_path()) as wheel:
        data = wheel.read(f"rapidocr_onnxruntime/models/{file}")
    actual = _sha256(data)
    if actual != FILES[file]:
        raise RapidOcrWheelError(f"{file} in {WHEEL} has sha256 {actual}, not the pinned {FILES[file]}")
    return data


def engine_dir() -> Path:
    """RapidOCR's own Python package, unpacked from the wheel into the cache (for the
    tests and the benchmark, which compare beamzoo with it; beamzoo never imports it)."""
    target = wheel_dir() / "rapidocr_onnxruntime-1.4.4"
    if not (target / "rapidocr_onnxruntime" / "main.py").exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        with zipfile.ZipFile(wheel_path()) as wheel:
            wheel.extractall(tmp)
        os.replace(tmp, target)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

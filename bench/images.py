"""A reproducible benchmark image set made from the package-shipped photos.

Each image is a seeded random rotation, crop and scale of one of the sample
photographs (beamzoo.samples.sample_files()), written as a JPEG of random
quality, 320x240 up to 1600x1200 (a quarter of them portrait). The set lives
in a cache directory keyed by (N, seed), so reruns reuse it.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from beamzoo.samples import sample_files

VERSION = 1  # bump when the recipe changes, so old caches are not reused


def set_dir(cache: str | Path, n: int, seed: int) -> Path:
    return Path(cache) / f"images-n{n}-seed{seed}-v{VERSION}"


def image_paths(directory: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(directory).glob("*.jpg"))


def make_one(sources: list[np.ndarray], seed: int, i: int) -> tuple[bytes, dict]:
    rng = np.random.default_rng([seed, i])
    src_index = int(rng.integers(len(sources)))
    src = sources[src_index]
    # Output size: width 320..1600 at 4:3, sometimes portrait.
    w = int(rng.integers(320, 1601))
    h = round(w * 3 / 4)
    if rng.random() < 0.25:
        w, h = h, w
    # Rotate about the centre; reflected borders avoid black corners.
    angle = float(rng.uniform(-25, 25))
    sh, sw = src.shape[:2]
    m = cv2.getRotationMatrix2D((sw / 2, sh / 2), angle, 1.0)
    img = cv2.warpAffine(src, m, (sw, sh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    # Random crop with the output's aspect ratio, 45%..100% of the largest that fits.
    fit = min(sw / w, sh / h)
    frac = float(rng.uniform(0.45, 1.0))
    cw, ch = max(8, int(w * fit * frac)), max(8, int(h * fit * frac))
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    img = img[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if cw > w else cv2.INTER_CUBIC
    img = cv2.resize(img, (w, h), interpolation=interp)
    quality = int(rng.integers(40, 96))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"could not encode image {i}")
    return buf.tobytes(), {"src": src_index, "w": w, "h": h, "angle": round(angle, 2), "q": quality}


def make_set(cache: str | Path, n: int, seed: int, log=print) -> Path:
    """The directory of N images for ``seed``, made on first use."""
    target = set_dir(cache, n, seed)
    if (target / "manifest.json").exists():
        return target
    log(f"making {n} images (seed {seed}) in {target} ...")
    srcs = [str(p) for p in sample_files()]
    sources = [cv2.imread(p, cv2.IMREAD_COLOR) for p in srcs]
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def write(i):
        data, meta = make_one(sources, seed, i)
        (tmp / f"{i:06d}.jpg").write_bytes(data)
        return meta

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        metas = list(pool.map(write, range(n)))
    manifest = {"n": n, "seed": seed, "version": VERSION, "opencv": cv2.__version__,
                "sources": [Path(p).name for p in srcs], "images": metas}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def make_cyclic(base: Path, n: int) -> Path:
    """A directory of ``n`` symlinks cycling through the images of ``base``."""
    files = image_paths(base)
    target = base.with_name(base.name + f"-cyclic{n}")
    if (target / "done").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for i in range(n):
        os.symlink(os.path.abspath(files[i % len(files)]), target / f"{i:06d}.jpg")
    (target / "done").write_text("ok\n")
    return target

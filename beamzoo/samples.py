"""A small set of real photographs that ship inside PyPI packages.

scikit-image ships test photographs (``skimage/data``) and scikit-learn two
JPEGs (``sklearn/datasets/images``); the quick start and the tests score them.
"""
from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

SKIMAGE = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
           "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png", "horse.png")
SKLEARN = ("china.jpg", "flower.jpg")


def _package_dir(module: str, sub: str) -> Path:
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pkg = module.split(".")[0].replace("skimage", "scikit-image").replace("sklearn", "scikit-learn")
        raise RuntimeError(f"the sample images ship in {pkg}: pip install {pkg} "
                           "(or pip install 'beamzoo[samples]')")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def sample_files() -> list[Path]:
    """Paths of the package-shipped sample photographs."""
    skimage = _package_dir("skimage", "data")
    sklearn = _package_dir("sklearn", "datasets/images")
    return [skimage / n for n in SKIMAGE] + [sklearn / n for n in SKLEARN]


def sample_path(name: str) -> Path:
    for p in sample_files():
        if p.name == name:
            return p
    raise KeyError(f"no sample image named {name!r}")


def make_sample_set(dest: str | Path) -> Path:
    """Copy the sample photographs into ``dest`` (created if needed); returns it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for src in sample_files():
        target = dest / src.name
        if not target.exists():
            shutil.copyfile(src, target)
    return dest

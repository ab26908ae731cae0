"""Model repositories: ``<repo>/<name>/<version>/card.yaml``, built-ins beside users' own.

The built-in repository ships in the package; ``BEAMZOO_ZOO`` (folders joined
by ``os.pathsep``) and ``add_repository`` add users' repositories. ``name``
means its newest version, ``name:version`` exactly that one, and a path to a
card file that card.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from beamzoo.zoo.card import BUILTIN, CardError, ModelCard, card_from_dict, shown
from beamzoo.zoo.verify import load_card

CARD_FILES = ("card.yaml", "card.yml", "card.json")
_extra: list[Path] = []
_builtins: dict[str, ModelCard] = {}
_lock = threading.Lock()


class UnknownModel(KeyError):
    """No model of that name or version in the zoo."""

    def __str__(self):
        return self.args[0]


def version_key(version: str) -> tuple:
    """Orders versions as people do: 2 < 10, 1.9 < 1.10, numbers before words."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._-]", version))


def add_repository(path: str | os.PathLike) -> Path:
    """Add a users' model repository (a folder of ``<name>/<version>/card.yaml``)."""
    p = Path(path).absolute()
    if not p.is_dir():
        raise CardError(str(p), None, "the model repository is not a folder")
    if p not in _extra:
        _extra.append(p)
    return p


def repositories() -> list[Path]:
    env = [Path(p).absolute() for p in os.environ.get("BEAMZOO_ZOO", "").split(os.pathsep) if p]
    for p in env:
        if not p.is_dir():
            raise CardError(str(p), None, "BEAMZOO_ZOO names a folder that does not exist")
    return [BUILTIN, *dict.fromkeys(env + _extra)]


def _card_file(d: Path) -> Path | None:
    return next((d / f for f in CARD_FILES if (d / f).is_file()), None)


def _load(repo: Path, name: str, version: str, verify: bool = True) -> ModelCard:
    path = _card_file(repo / name / version)
    if repo == BUILTIN:
        with _lock:
            ref = f"{name}:{version}"
            if ref not in _builtins:
                _builtins[ref] = load_card(path, builtin=True, root=repo)
            card = _builtins[ref]
    else:
        card = load_card(path, verify=verify, root=repo)  # its files lie in the repository
    if (card.name, card.version) != (name, version):
        raise CardError(str(path), "name" if card.name != name else "version",
                        f"the card says {card.ref}, but it lies in {name}/{version}/; "
                        "a repository is laid out as <name>/<version>/card.yaml")
    return card


def _entries() -> dict[tuple[str, str], Path]:
    """(name, version) -> repository, refusing one model version in two repositories."""
    seen: dict[tuple[str, str], Path] = {}
    for repo in repositories():
        for d in sorted(repo.iterdir()) if repo.is_dir() else ():
            if not d.is_dir():
                continue
            for v in sorted(d.iterdir()):
                if v.is_dir() and _card_file(v) is not None:
                    key = (d.name, v.name)
                    if key in seen:
                        raise CardError(str(_card_file(v)), "version",
                                        f"{d.name}:{v.name} is also in {seen[key]}; one version lives in one place")
                    seen[key] = repo
    return seen


def versions(name: str) -> list[str]:
    return sorted((v for n, v in _entries() if n == name), key=version_key)


def builtin(ref: str) -> ModelCard | None:
    """The built-in card ``name:version``, or None."""
    name, _, version = ref.partition(":")
    if not version or _card_file(BUILTIN / name / version) is None:
        return None
    return _load(BUILTIN, name, version)


def get(ref: str) -> ModelCard:
    """A card by ``name``, ``name:version`` or the path of a card file."""
    if _looks_like_path(ref):
        return load_card(ref)
    name, _, version = ref.partition(":")
    entries = _entries()
    have = sorted((v for n, v in entries if n == name), key=version_key)
    if not have:
        names = sorted({n for n, _ in entries})
        raise UnknownModel(f"no model named {shown(name)} in the zoo; known: {', '.join(names)} "
                           "(or give a card file: --model path/to/card.yaml)")
    if version and version not in have:
        raise UnknownModel(f"model {shown(name)} has no version {shown(version)}; its versions: {', '.join(have)}")
    version = version or have[-1]
    return _load(entries[(name, version)], name, version)


def all_cards(verify: bool = True) -> list[ModelCard]:
    """Every card of every repository; ``verify=False`` leaves users' files unchecked (for listing)."""
    entries = _entries()
    return [_load(repo, n, v, verify) for (n, v), repo in sorted(entries.items(), key=lambda e: (e[0][0], version_key(e[0][1])))]


def _looks_like_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml", ".json")) or os.sep in ref or "/" in ref


def card_of(param: str | dict | ModelCard) -> ModelCard:
    """The card a graph step's parameter names: a built-in or zoo model by ``name[:version]``,
    a card file by its path, or a whole card (JSON data, as a graph holds a user's card)."""
    if isinstance(param, ModelCard):
        return param
    if isinstance(param, str):
        return get(param)
    if not isinstance(param, dict):
        raise TypeError(f"a model is a zoo name[:version], a card file or a card, got {type(param).__name__}")
    d = dict(param)
    d.pop("build", None)  # a card inside a graph names its file; it is never built from there
    where = d.get("card_path") or f"{d.get('name')}:{d.get('version')}"
    return card_from_dict(d, where, base=None)


def card_param(card: str | dict | ModelCard) -> str | dict:
    """A card as a graph step holds it: a built-in by reference, else whole."""
    card = card_of(card)
    return card.ref if builtin(card.ref) == card else card.as_dict()

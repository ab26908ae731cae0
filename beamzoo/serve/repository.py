"""A watched model repository: a folder laid out as a zoo repository
(``<folder>/<name>/<version>/card.yaml``) whose versions are served, following
the folder while the server runs.

``Repository.scan`` looks at the folder once. A version new there is loaded
(its card verified as the zoo verifies a user's card, its model loaded) and
only then served, so the name alone moves to it once it is the newest; a
version whose folder is gone is retired (a request naming it exactly gets
404, what it had queued is answered). A version that does not verify or load
is refused, with one line on stderr and its reason in the index; the versions
before it serve on, and it is tried again once something in its folder
changes. A version served is not loaded again when its files change: a
changed model is a new version. Names starting with "." are skipped: copy a
version in under a dot name, then rename it. A thread scans every ``poll_s``
seconds (0: only when asked).

``index``, ``load`` and ``unload`` are the repository API of the HTTP server
(``POST /v2/repository/index`` and ``/v2/repository/models/NAME/load|unload``,
as Triton and MLServer have it).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from beamzoo.core.knobs import Knob, bind
from beamzoo.core.op import error_text
from beamzoo.pipeline import user_errors
from beamzoo.serve.batcher import Closed
from beamzoo.serve.models import Servable, UnknownServable
from beamzoo.zoo.card import CardError
from beamzoo.zoo.repository import CARD_FILES, version_key
from beamzoo.zoo.verify import load_card

REPOSITORY_KNOBS = {
    "poll_s": Knob(10.0, float, low=0.0, results=False, unit="seconds",
                   doc="seconds between looks at the --zoo repository for versions added or removed; 0: only "
                       "on request, by POST /v2/repository/models/NAME/load"),
}


class RepositoryError(Exception):
    """A repository request that cannot be done: ``status`` (HTTP) and one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _order(key: tuple[str, str]) -> tuple:
    return key[0], version_key(key[1])


def _stamp(folder: Path) -> tuple:
    """What a version's folder holds now: each file's path, size and modification time."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # in place: the walk's order is fixed
        for f in sorted(files):
            path = os.path.join(root, f)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed while looked at
                continue
            out.append((os.path.relpath(path, folder), st.st_size, st.st_mtime_ns))
    return tuple(out)


def versions_in(folder) -> dict[tuple[str, str], tuple]:
    """(name, version) -> the stamp of its folder, for every version folder of ``folder`` with a card."""
    out = {}
    for d in sorted(Path(folder).iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            for v in sorted(d.iterdir()):
                if not v.name.startswith(".") and v.is_dir() and any((v / f).is_file() for f in CARD_FILES):
                    out[(d.name, v.name)] = _stamp(v)
        except FileNotFoundError:  # removed while looked at
            continue
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, (*user_errors(), ValueError)) else error_text(exc)
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:599] + "…"


class Repository:
    """Serves the versions of ``folder`` through ``server`` (its ``load`` and ``unload``), every
    model of it or, given ``only``, the models so named; ``model_knobs``: ``Classify``'s, as for
    ``--model`` (``topk``, ``max_pixels``)."""

    knobs = REPOSITORY_KNOBS

    def __init__(self, server, folder, only=None, model_knobs: dict | None = None, **knobs):
        p = bind(type(self).__name__, self.knobs, (), (), knobs)
        self.server, self.poll_s = server, p["poll_s"]
        self.folder = Path(folder).absolute()
        if not self.folder.is_dir():
            raise ValueError(f"the model repository {self.folder} is not a folder (--zoo DIR)")
        self.model_knobs = dict(model_knobs or {})
        self.only = None if only is None else set(only)  # the names served; None: every name
        self.held: set[str] = set()  # names unloaded on request: served again only when loaded on request
        self.loaded: dict[tuple[str, str], tuple] = {}  # versions this repository serves -> their stamp
        self.refused: dict[tuple[str, str], tuple[tuple, str]] = {}  # -> (stamp, why)
        self.found: dict[tuple[str, str], tuple] = {}  # what the last scan saw
        self._scanning = threading.Lock()  # one scan (or unload) at a time
        self._state = threading.Lock()  # what the index reads; held only briefly
        self._stop = threading.Event()
        self._trouble = None  # the last failure of a polled scan, said once
        self._quiet = True  # the first scan says only what it refused (the server then lists what it serves)
        self.scan()
        self._quiet = False
        self.thread = None
        if self.poll_s > 0:
            self.thread = threading.Thread(target=self._poll, name="beamzoo-repository", daemon=True)
            self.thread.start()

    def __str__(self) -> str:
        when = f"looked at every {self.poll_s:g} s" if self.poll_s > 0 else "looked at when asked"
        return f"{self.folder}, {when}"

    def _say(self, text: str) -> None:
        print(f"beamzoo serve: repository {self.folder}: {text}", file=sys.stderr, flush=True)

    def _follows(self, name: str) -> bool:
        with self._state:
            return name not in self.held and (self.only is None or name in self.only)

    def scan(self, names=None, again: bool = False) -> dict[tuple[str, str], str]:
        """Look at the folder now (at the models ``names`` only, when given): load the versions new
        there, retire those gone. Returns the versions refused, with why; ``again``: try refused
        versions again even where their folder did not change."""
        with self._scanning:
            found = versions_in(self.folder)
            served = self.server.services
            with self._state:
                for key in [k for k in self.loaded if k not in served]:  # unloaded by other means
                    del self.loaded[key]
            mine = [k for k in found if names is None or k[0] in names]
            wanted = {k for k in mine if self._follows(k[0])}
            refused = {}
            for key in sorted(wanted - set(self.loaded) - set(served), key=_order):
                old = self.refused.get(key)
                if old is not None and old[0] == found[key] and not again:
                    continue
                try:
                    self._load(*key)
                except Closed:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bad version is refused; the others serve on
                    refused[key] = _reason(exc)
                    with self._state:
                        self.refused[key] = (found[key], refused[key])
                    self._say(f"refused {key[0]}:{key[1]}: {refused[key]}; {self._serving(key[0])}")
                    continue
                with self._state:
                    self.loaded[key] = found[key]
                    self.refused.pop(key, None)
                if not self._quiet:
                    self._say(f"serving {key[0]}:{key[1]}; {self._serving(key[0])}")
            for key in sorted(k for k in self.loaded if k not in wanted and (names is None or k[0] in names)):
                try:
                    self.server.unload(*key)
                except UnknownServable:  # unloaded by other means meanwhile
                    pass
                with self._state:
                    del self.loaded[key]
                self._say(f"retired {key[0]}:{key[1]} (its folder is gone); it answers what it has queued; "
                          f"{self._serving(key[0])}")
            with self._state:
                self.found = found
                for key in [k for k in self.refused if k not in found]:
                    del self.refused[key]
            return refused

    def _load(self, name: str, version: str) -> None:
        folder = self.folder / name / version
        path = next(folder / f for f in CARD_FILES if (folder / f).is_file())
        card = load_card(path, verify=True, root=self.folder)
        if (card.name, card.version) != (name, version):
            raise CardError(str(path), "name" if card.name != name else "version",
                            f"the card says {card.ref}, but it lies in {name}/{version}/; "
                            "a repository is laid out as <name>/<version>/card.yaml")
        self.server.load(Servable.from_model(card, self.server.max_batch, **self.model_knobs))

    def _serving(self, name: str) -> str:
        try:
            versions = self.server.catalog.versions(name)
        except UnknownServable:
            return f"{name} is not served"
        return f"{name} serves version{'s' if len(versions) > 1 else ''} {', '.join(versions)}"

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.scan()
                self._trouble = None
            except Closed:
                return
            except Exception as exc:  # noqa: BLE001 - the folder unreadable for a while: what serves goes on
                trouble = f"cannot look at it: {error_text(exc)}; what it served serves on, looking again in " \
                          f"{self.poll_s:g} s"
                if trouble != self._trouble:
                    self._say(trouble)
                self._trouble = trouble

    # ---------------------------------------------------------------- the repository API

    def load(self, name: str) -> dict:
        """Serve every version of ``name`` the folder has (again, if it was unloaded), trying
        refused ones again; ``RepositoryError`` if the folder has no such model (404) or a
        version of it is refused (400)."""
        names = {n for n, _ in versions_in(self.folder)}
        if name not in names:
            raise RepositoryError(f"no model named {name!r} in the repository {self.folder}; it has: "
                                  f"{', '.join(sorted(names)) or 'none'}", 404)
        with self._state:
            self.held.discard(name)
            if self.only is not None:
                self.only.add(name)
        refused = self.scan({name}, again=True)
        if refused:
            raise RepositoryError("; ".join(f"{n}:{v} is refused: {why}" for (n, v), why in sorted(refused.items()))
                                  + f"; {self._serving(name)}")
        return {"name": name, "versions": self.server.catalog.versions(name)}

    def unload(self, name: str) -> dict:
        """Stop serving every version of ``name`` once what they have queued is answered, and do
        not serve it again until it is loaded on request; ``RepositoryError`` (404) if it is
        neither served nor in the folder."""
        with self._scanning:  # a scan under way ends first: it cannot serve the name again behind this
            try:
                taken = self.server.unload(name)
            except UnknownServable as exc:
                if name not in {n for n, _ in versions_in(self.folder)}:
                    raise RepositoryError(str(exc), 404) from None
                taken = []
            with self._state:
                self.held.add(name)
                for key in [k for k in self.loaded if k[0] == name]:
                    del self.loaded[key]
        self._say(f"unloaded {name} on request" + (f" (versions {', '.join(s.version for s in taken)}); they answer "
                                                  "what they have queued" if taken else ""))
        return {"name": name, "versions": [s.version for s in taken]}

    def unserved(self) -> dict[tuple[str, str], str]:
        """Why each version the folder holds now is not served by it."""
        try:
            now = versions_in(self.folder)
        except OSError:  # unreadable for a while: what the last look saw
            now = self.found
        with self._state:
            out = {}
            for key in now:
                if key in self.loaded:
                    continue
                name = key[0]
                if key in self.refused:
                    out[key] = self.refused[key][1]
                elif name in self.held:
                    out[key] = f"unloaded on request; POST /v2/repository/models/{name}/load serves it again"
                elif self.only is not None and name not in self.only:
                    out[key] = (f"not loaded (the server serves only the --model names); "
                                f"POST /v2/repository/models/{name}/load serves it")
                else:
                    out[key] = "not loaded yet: the next look at the repository loads it"
            return out

    def close(self, timeout: float | None = 60.0) -> None:
        """Look no more (a scan under way ends first)."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout)


def _repository(server) -> Repository:
    if server.repository is None:
        raise RepositoryError("this server has no model repository to load models from or unload them to: "
                              "start it with --zoo DIR")
    return server.repository


def index(server, ready: bool = False) -> list[dict]:
    """Every version served (``READY``) and, unless ``ready``, every version of the repository
    that is not (``UNAVAILABLE``, with the reason), by name and version."""
    rows = {(s.name, s.version): {"name": s.name, "version": s.version, "state": "READY", "reason": ""}
            for s in server.catalog}
    if server.repository is not None and not ready:
        for (name, version), why in server.repository.unserved().items():
            rows.setdefault((name, version), {"name": name, "version": version, "state": "UNAVAILABLE",
                                              "reason": why})
    return [rows[k] for k in sorted(rows, key=_order)]


def load(server, name: str) -> dict:
    return _repository(server).load(name)


def unload(server, name: str) -> dict:
    return _repository(server).unload(name)


__all__ = ["REPOSITORY_KNOBS", "Repository", "RepositoryError", "index", "load", "unload", "versions_in"]

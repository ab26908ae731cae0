"""Listing and reading input files."""
from __future__ import annotations

import fnmatch
import glob
import os

import pyarrow as pa

from beamzoo.core import Hints, RowOperator
from beamzoo.schemas import PATH

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def list_files(pattern: str) -> list[str]:
    """Sorted files matching a glob (``**`` recurses); a directory means its images.

    Symbolic links are followed, but each directory is visited once, so a
    cycle of links ends. Remote patterns (``gs://``, ``s3://`` ...) go through fsspec.
    """
    if "://" in pattern and not pattern.startswith("file://"):
        try:
            import fsspec
        except ImportError as exc:
            raise RuntimeError(f"reading {pattern!r} needs fsspec: pip install fsspec") from exc
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        return sorted(fs.unstrip_protocol(p) for p in paths if fs.isfile(p))
    pattern = pattern.removeprefix("file://")
    if os.path.isdir(pattern):
        return sorted(p for p in _walk(pattern) if p.lower().endswith(IMAGE_EXTENSIONS))
    if "**" not in pattern:
        return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else ".")
    found = []
    for path in _walk(root):
        rel = os.path.relpath(path, root).split(os.sep)
        if _match(rel, parts[fixed:]):
            found.append(path if parts[:fixed] else os.path.relpath(path))
    return sorted(found)


def _walk(root: str):
    """Every file below ``root``, following links, each directory once, hidden names skipped."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and os.path.isfile(path):
                yield path


def _match(parts: list[str], pats: list[str]) -> bool:
    """Glob matching of path segments, where a ``**`` segment matches any number of them."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def split_unencodable(paths: list[str]) -> tuple[list[str], list[str]]:
    """(paths Arrow can hold, names that are not valid UTF-8)."""
    ok, bad = [], []
    for p in paths:
        try:
            p.encode("utf-8")
            ok.append(p)
        except UnicodeEncodeError:
            bad.append(p)
    return ok, bad


def printable(path: str) -> str:
    """A path that is not valid UTF-8, with its odd bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_bytes(path: str) -> bytes:
    if "://" in path and not path.startswith("file://"):
        import fsspec
        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path.removeprefix("file://"), "rb") as f:
        return f.read()


class ReadFiles(RowOperator):
    """path -> data (the file's bytes). Refuses empty files and files over ``max_bytes``."""

    produces = pa.schema([pa.field("data", pa.binary())])
    requires = pa.schema([PATH])

    def __init__(self, max_bytes: int = 256 << 20, name: str = "read", hints: Hints | None = None):
        super().__init__(name, hints)
        self.max_bytes = max_bytes

    def process_row(self, row):
        path = row["path"]
        size = os.path.getsize(path) if "://" not in path else None
        if size is not None and size > self.max_bytes:
            raise ValueError(f"file is {size} bytes, over the limit of {self.max_bytes} "
                             "(raise max_bytes to accept it)")
        data = read_bytes(path)
        if not data:
            raise ValueError("empty file (0 bytes)")
        if len(data) > self.max_bytes:
            raise ValueError(f"file is {len(data)} bytes, over the limit of {self.max_bytes}")
        return {"data": data}

    def fingerprint(self):
        return {**super().fingerprint(), "max_bytes": self.max_bytes}

"""Listing and reading input files."""
from __future__ import annotations

import glob
import os

import pyarrow as pa

from beamzoo.core import Hints, RowOperator
from beamzoo.schemas import PATH

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def list_files(pattern: str) -> list[str]:
    """Sorted files matching a glob (``**`` recurses); a directory means its images.

    Remote patterns (``gs://``, ``s3://`` ...) go through fsspec.
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
        found = [p for p in glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        found = glob.glob(pattern, recursive=True)
    return sorted(p for p in found if os.path.isfile(p))


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

"""Listing and reading input files."""
from __future__ import annotations

import fnmatch
import glob
import os
import queue
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.op import RowOperator
from beamzoo.core.schemas import PATH
from beamzoo.imaging import EXTENSIONS
from beamzoo.transforms.isolated import DEFAULT_TIME_LIMIT, Refused

IMAGE_EXTENSIONS = EXTENSIONS


def is_remote(pattern: str) -> bool:
    return "://" in pattern and not pattern.startswith("file://")


def iter_files(pattern: str) -> Iterator[str]:
    """Files matching a glob (``**`` recurses), as the listing finds them; a
    directory means the images below it. Names come sorted within a directory.

    Symbolic links are followed, but each directory is visited once, so a
    cycle of links ends. Whatever is not a directory is listed, so that a
    FIFO, a device or a dangling link becomes a dead letter instead of being
    left out. Remote patterns (``gs://``, ``s3://`` ...) go through fsspec.
    """
    if is_remote(pattern):
        try:
            import fsspec
        except ImportError as exc:
            raise RuntimeError(f"reading {pattern!r} needs fsspec: pip install fsspec") from exc
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        yield from sorted(fs.unstrip_protocol(p) for p in paths if fs.isfile(p))
        return
    pattern = pattern.removeprefix("file://")
    if os.path.isdir(pattern):
        yield from (p for p in _walk(pattern) if p.lower().endswith(IMAGE_EXTENSIONS))
        return
    if "**" not in pattern:
        yield from sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
        return
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else ".")
    for path in _walk(root):
        if _match(os.path.relpath(path, root).split(os.sep), parts[fixed:]):
            yield path if parts[:fixed] else os.path.relpath(path)


def any_file(pattern: str) -> bool:
    """Whether anything matches, found without listing everything (a run lists once)."""
    if not is_remote(pattern) and "**" not in pattern and not os.path.isdir(pattern.removeprefix("file://")):
        return any(not os.path.isdir(p) for p in glob.iglob(pattern.removeprefix("file://")))
    return next(iter_files(pattern), None) is not None


def list_files(pattern: str) -> list[str]:
    """All of ``iter_files(pattern)``, sorted."""
    return sorted(iter_files(pattern))


def _walk(root: str):
    """Every non-directory below ``root``, following links, each directory once, hidden names skipped."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and not os.path.isdir(os.path.join(dirpath, name)):
                yield os.path.join(dirpath, name)


def _match(parts: list[str], pats: list[str]) -> bool:
    """Glob matching of path segments, where a ``**`` segment matches any number of them."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def encodable(path: str) -> bool:
    """Whether Arrow can hold the name (valid UTF-8)."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(path: str) -> str:
    """A path that is not valid UTF-8, with its odd bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# What object stores say of an object's version (fsspec's ``info()``); sorted into a stamp.
VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "VersionId", "version_id", "LastModified",
                  "last_modified", "updated", "mtime", "created")


def file_stamp(path: str | None) -> str | None:
    """What the file system already knows of a file's version, without reading it: a local
    file's size and modification time (``mtime_ns``); an object's size and what its store
    gives of ETag, generation, modification time (fsspec ``info()``, which answers from
    the listing where the store keeps one). None where nothing marks a change: an http(s)
    URL, a file that is not there or not a regular file."""
    if not path:
        return None
    if is_remote(path):
        if path.lower().startswith(("http://", "https://")):
            return None  # asking would cost a request per input; the content decides
        try:
            import fsspec
            fs, inner = fsspec.core.url_to_fs(path)
            info = fs.info(inner)
        except Exception:  # noqa: BLE001 - no stamp: the read says what is wrong
            return None
        marks = sorted((k, _plain(info[k])) for k in VERSION_FIELDS if info.get(k) is not None)
        return f"{info.get('size')}:{marks}" if marks and info.get("type", "file") == "file" else None
    try:
        st = os.stat(path.removeprefix("file://"))
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None


def _plain(value) -> str:
    """A stamp's value, the same whether a store gives a time as a datetime or as seconds."""
    return repr(value.timestamp()) if hasattr(value, "timestamp") else str(value)


def read_bytes(path: str, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of a regular file, whatever it has become since it was listed."""
    if is_remote(path):
        import fsspec
        with fsspec.open(path, "rb") as f:
            return f.read(max_bytes + 1)
    fd = os.open(path.removeprefix("file://"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "not a file"
            raise ValueError(f"not a regular file ({kind}); only regular files are read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


_readers = threading.local()


def _forget_readers() -> None:
    """In a forked child: the readers' threads were not copied."""
    global _readers
    _readers = threading.local()


os.register_at_fork(after_in_child=_forget_readers)


def _serve(jobs: queue.SimpleQueue, owner: threading.Thread) -> None:
    """Reads for ``owner`` until told to stop, or until ``owner`` has ended."""
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if owner.is_alive():
                continue
            return
        if job is None:
            return
        future, path, max_bytes = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(read_bytes(path, max_bytes))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)


def read_within(path: str, max_bytes: int, seconds: float) -> bytes:
    """``read_bytes`` within ``seconds`` of wall time, or ``Refused("timeout: ...")``. The read runs in
    a reader thread of the calling thread's own; one that is stuck (a stalled server,
    a hung mount: a read that neither Python nor a signal can cut short) is left to
    finish on its own, and the next read gets a new reader."""
    jobs = getattr(_readers, "jobs", None)
    if jobs is None:
        jobs = _readers.jobs = queue.SimpleQueue()
        threading.Thread(target=_serve, args=(jobs, threading.current_thread()), name="beamzoo-read",
                         daemon=True).start()
    future: Future = Future()
    jobs.put((future, path, max_bytes))
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        _readers.jobs = None
        jobs.put(None)  # that reader ends once its read does
        raise Refused(f"timeout: reading took over {seconds:g} s (raise time_limit to allow more)") from None


BINARY_LIMIT = (2 << 30) - 1  # the bytes one Arrow binary array can hold


class ReadFiles(RowOperator):
    """path -> data (the file's bytes). Refuses empty files, files over ``max_bytes``,
    anything that is not a regular file, and reads that take over ``time_limit``.

    A batch is read in pieces of at most ``batch_bytes`` of file bytes (a bigger
    file is a piece alone), one piece at a time, so that what is in memory is
    bounded in bytes and no batch reaches Arrow's 2 GiB binary limit.
    """

    name = "read_files"
    default_id = "read"
    knobs = {"max_bytes": Knob(256 << 20, int, low=1, high=BINARY_LIMIT - 1, unit="bytes",
                               doc="refuse larger files"),
             "batch_bytes": Knob(256 << 20, int, low=1, high=BINARY_LIMIT, results=False, unit="bytes",
                                 doc="file bytes a batch holds at most (a larger file goes alone)"),
             "time_limit": Knob(DEFAULT_TIME_LIMIT, float, low=0.01, results=False, unit="seconds",
                                doc="seconds of wall time one file may take to read")}
    requires = pa.schema([PATH])
    produces = pa.schema([pa.field("data", pa.binary())])
    loads_input = True  # a path in, the input's content out: resume keys rows after this step

    def process_pieces(self, batch):
        rows, budget = self.rows(batch), self.params["batch_bytes"]
        start, outs, size = 0, [], 0
        for i, out in enumerate(self.process_rows([row])[0] for row in rows):  # read lazily
            n = len(out["data"]) if isinstance(out, dict) else 0
            if outs and size + n > budget:
                yield self.result(batch.slice(start, len(outs)), outs)
                start, outs, size = i, [], 0
            outs.append(out)
            size += n
        yield self.result(batch.slice(start, len(outs)), outs)

    def process_row(self, row):
        limit = self.params["max_bytes"]
        data = read_within(row["path"], limit, self.params["time_limit"])
        if not data:
            raise ValueError("empty file (0 bytes)")
        if len(data) > limit:
            raise ValueError(f"file is over the limit of {limit} bytes (raise max_bytes to accept it)")
        return {"data": data}

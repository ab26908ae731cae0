"""One run per output folder: an advisory lock file, and safe glob patterns.

lock_output(folder) holds an exclusive flock on folder/.beamzoo.lock for the
length of a run, so that two runs never write (or resume into) the same folder
at once. escaped(folder, "*.parquet") builds a glob pattern from a user's folder
name without its own ?, * or [ being read as wildcards.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import os
import socket
import stat
import sys

LOCK_NAME = ".beamzoo.lock"


class OutputLocked(RuntimeError):
    """Another live run holds the output folder (or its lock file is unsafe)."""


def _holder(fd: int) -> str:
    """What the lock file says about its holder, for the error message."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return (f"pid {info['pid']} on host {info['host']}, "
                f"started {info['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        # The holder may be between taking the lock and writing its info.
        return "holder unknown"


class _OutputLock(contextlib.AbstractContextManager):
    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self) -> str:
        os.makedirs(self.directory, exist_ok=True)
        # O_NOFOLLOW: never lock (and later truncate) a symlink's target.
        # O_CLOEXEC (os.open's default anyway, PEP 446): programs this run
        # execs must not inherit the lock and keep it after the run dies.
        # O_NONBLOCK: opening a FIFO planted at the path must not hang.
        flags = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                 | os.O_NONBLOCK)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputLocked(f"refusing to lock {self.path}: it is a "
                                   f"symlink; remove it and run again") from e
            if e.errno == errno.EISDIR:
                raise OutputLocked(f"refusing to lock {self.path}: it is not a "
                                   f"regular file; remove it and run again") from e
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputLocked(f"refusing to lock {self.path}: it is not a "
                                   f"regular file; remove it and run again")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputLocked(
                    f"another beamzoo run ({_holder(fd)}) is writing to "
                    f"{self.directory}; wait for it to end or choose another "
                    f"--output") from None
            # The kernel drops an flock when its holder dies, so getting it
            # here means nobody alive holds the folder: whatever JSON a dead
            # run left behind is stale and is simply overwritten. No guessing
            # from pids (which are reused, and mean nothing on another host).
            started = datetime.datetime.now(datetime.timezone.utc)
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": started.isoformat(timespec="seconds"),
                    "argv": sys.argv[:8]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8") + b"\n", 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._pid = fd, os.getpid()
        return self.path

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # A forked child shares the parent's open file description: its
            # LOCK_UN would release the parent's lock, so it only closes.
            if os.getpid() == self._pid:
                os.ftruncate(fd, 0)  # clear the holder; keep the file, since
                fcntl.flock(fd, fcntl.LOCK_UN)  # unlinking races a new locker
        finally:
            os.close(fd)


def lock_output(directory: str) -> contextlib.AbstractContextManager:
    """Hold `directory` for one run: `with lock_output(out): ...`.

    Creates the folder if needed; raises OutputLocked at once if another live
    process holds it. The context value is the lock file's path.
    """
    return _OutputLock(directory)


def escaped(directory: str, *parts: str) -> str:
    """A glob pattern under a literal folder name; parts are patterns.

    >>> escaped("res?1[a]", "*.parquet")
    'res[?]1[[]a]/*.parquet'
    """
    return os.path.join(glob.escape(directory), *parts)

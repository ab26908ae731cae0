"""The files a card names: inside its folder, regular, not too big, checked before they are opened.

``confined`` resolves a path a card gives (links followed) and refuses one
outside the card's folder (or its repository); ``regular`` refuses what is not
a regular file of at most so many bytes, from its ``stat`` alone; ``read``
reads such a file, checking the open file again. A refusal (``Refused``) says
what is wrong with the path, never what the file holds.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

CARD_MAX = 1 << 20  # a card file
LABELS_MAX = 4 << 20  # a labels file
MODEL_MAX = (2 << 30) - 1  # an ONNX file: a protobuf cannot reach 2 GiB
CHUNK = 1 << 20
_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


class Refused(ValueError):
    """A path that is not a file a card may use; the message continues "<the path> ..."."""


def size_text(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def confined(rel: str | os.PathLike, base: Path, root: Path) -> Path:
    """``rel`` (relative to ``base``, or absolute) with its links resolved, once that lies inside ``root``."""
    if "\0" in str(rel):
        raise Refused("is not a file name (it holds a NUL character)")
    real = Path(os.path.realpath(Path(base) / rel))
    top = Path(os.path.realpath(root))
    if real != top and top not in real.parents:
        raise Refused(f"lies outside {root} (links followed): a card names only files in its own folder"
                      f"{'' if Path(root) == Path(base) else ' or its repository'}")
    return real


def regular(path: str | os.PathLike, cap: int) -> int:
    """The size of ``path``, once its ``stat`` says it is a regular file of at most ``cap`` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Refused("does not exist") from None
    except OSError as exc:
        raise Refused(f"cannot be read: {exc.strerror or type(exc).__name__}") from None
    _check(st, cap)
    return st.st_size


def _check(st: os.stat_result, cap: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Refused("is not a regular file (it is a folder, a device or a pipe)")
    if st.st_size > cap:
        raise Refused(f"is {size_text(st.st_size)}, more than the {size_text(cap)} allowed")


def read(path: str | os.PathLike, cap: int, hasher=None) -> bytes:
    """The bytes of the regular file ``path`` (links resolved), at most ``cap`` of them, in chunks
    (each fed to ``hasher`` when given). Its ``stat`` is checked before it is opened, and the open
    file's again (a pipe, a device or a file swapped in between is refused, never read)."""
    if "\0" in str(path):
        raise Refused("is not a file name (it holds a NUL character)")
    real = os.path.realpath(path)
    regular(real, cap)
    try:
        fd = os.open(real, _FLAGS)
    except OSError as exc:
        raise Refused(f"cannot be read: {exc.strerror or type(exc).__name__}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        _check(st, cap)
        buf = bytearray(st.st_size)
        view, done = memoryview(buf), 0
        while done < st.st_size:
            n = f.readinto(view[done:done + CHUNK])
            if not n:
                break
            if hasher is not None:
                hasher.update(view[done:done + n])
            done += n
        view.release()
        if done != st.st_size or f.read(1):
            raise Refused("changed while it was read")
    return bytes(buf)

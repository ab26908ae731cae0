"""Heavy runtime state shared by every thread of a process.

A runner makes operators per worker thread (Beam makes a DoFn per thread);
what they load, an onnxruntime session say, is made once per process and
key and shared, since a session's ``run`` is thread-safe. A holder (a
long-lived run context: a served model version) may give back what it used:
an object is forgotten once every holder of it has released it, unless it was
also taken without a holder (those stay for the process).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

_lock = threading.Lock()
_made: dict[Any, Any] = {}
_holders: dict[Any, set] = {}  # key -> the holders using it
_kept: set = set()  # keys taken without a holder: kept for the process


def shared(key: Any, make: Callable[[], Any], holder: Any = None) -> Any:
    """The one object for ``key`` in this process, made by ``make`` on first use; ``holder``:
    who uses it until it calls ``release``."""
    with _lock:
        if key not in _made:
            _made[key] = make()
        if holder is None:
            _kept.add(key)
        else:
            _holders.setdefault(key, set()).add(holder)
        return _made[key]


def release(holder: Any) -> int:
    """``holder`` uses nothing any more; returns how many objects were forgotten with it."""
    with _lock:
        gone = []
        for key, users in list(_holders.items()):
            users.discard(holder)
            if not users:
                del _holders[key]
                if key not in _kept:
                    gone.append(_made.pop(key, None))
        return len(gone)


def held() -> list:
    """The keys of what is made now."""
    with _lock:
        return list(_made)


def clear() -> None:
    """Forget everything made (tests that replace a model file use it)."""
    with _lock:
        _made.clear()
        _holders.clear()
        _kept.clear()

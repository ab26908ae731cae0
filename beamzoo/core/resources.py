"""Heavy runtime state shared by every thread of a process.

A runner makes operators per worker thread (Beam makes a DoFn per thread);
what they load, an onnxruntime session say, is made once per process and
key and shared, since a session's ``run`` is thread-safe.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

_lock = threading.Lock()
_made: dict[Any, Any] = {}


def shared(key: Any, make: Callable[[], Any]) -> Any:
    """The one object for ``key`` in this process, made by ``make`` on first use."""
    with _lock:
        if key not in _made:
            _made[key] = make()
        return _made[key]


def clear() -> None:
    """Forget everything made (tests that replace a model file use it)."""
    with _lock:
        _made.clear()

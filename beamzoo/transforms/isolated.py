"""Decoding under per-input limits, in worker processes that can be killed.

A decode step hands each row's file bytes to a pool of worker processes
(``beamzoo.isolate``: one per core, shared by the step's threads in a
process). There the bytes are sniffed, decoded and, for the fused
decode+resize step, resized and cropped, so that only the small uint8 image
comes back. An input over the time or memory limit is a dead letter whose
reason starts with ``timeout`` or ``memory`` (``crash`` if its decoder
crashed); the worker is replaced and the run goes on. The workers' OpenCV
refuses images over ``max_pixels`` itself (``OPENCV_IO_MAX_IMAGE_PIXELS``).
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from beamzoo.core import Knob
from beamzoo.isolate import _MEMORY_HINTS, IsolatedPool, IsolationFailure, Limits
from beamzoo.resources import shared

DEFAULT_TIME_LIMIT = 5.0
DEFAULT_MEMORY_CAP = 2 << 30

KNOBS = {
    "isolate": Knob(True, bool, results=False,
                    doc="decode in worker processes under time_limit and memory_limit (False: in this "
                        "process, without those limits)"),
    "time_limit": Knob(DEFAULT_TIME_LIMIT, float, low=0.01, results=False,
                       doc="seconds of wall and of CPU time one input may take to sniff and decode"),
    "memory_limit": Knob(None, int, low=64 << 20, results=False,
                         doc="bytes of memory one input may take to decode (default: 2 GiB, or "
                             "less on a small machine: RAM / (2 x workers))"),
}


def workers() -> int:
    return len(os.sched_getaffinity(0))


def default_memory_limit() -> int:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(DEFAULT_MEMORY_CAP, ram // (2 * workers()))


class Refused(Exception):
    """An input refused by a per-input limit (a worker gave up on it, or its read took too
    long): ``dead_letter_reason`` is the dead letter's reason, as is."""

    def __init__(self, reason: str, stage: str | None = None):
        super().__init__(reason)
        self.dead_letter_reason = reason
        if stage is not None:
            self.stage = stage


def work(item):
    """In a worker: ``(data, job)`` -> the uint8 image, or ``(part, reason)`` for a bad input
    (part 0: decoding, 1: resizing). Running out of memory is raised, for the pool to report."""
    import cv2

    from beamzoo.core import error_text
    from beamzoo.transforms.preprocess import decode, resize_crop
    data, (max_pixels, min_side, channels, resize) = item
    data = data.obj if isinstance(data, memoryview) else data  # the bytearray it was received into
    part = 0
    try:
        img = decode(data, max_pixels, min_side, "BGR" if resize else channels)
        if resize:
            part = 1
            size, crop, shrink = resize
            img = resize_crop(img, size, crop, shrink)
            if channels == "RGB":
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(img)
    except Exception as exc:  # noqa: BLE001 - the dead letter's reason
        if isinstance(exc, MemoryError) or any(h in str(exc) for h in _MEMORY_HINTS):
            raise
        return part, error_text(exc)


_threads_set = False


def _work(item):
    global _threads_set
    if not _threads_set:
        import cv2
        cv2.setNumThreads(1)  # one worker per core is the parallelism
        _threads_set = True
    return work(item)


def pool(max_pixels: int, time_limit: float, memory_limit: int | None) -> IsolatedPool:
    """The process's pool for these limits (made on first use, warm from then on)."""
    memory = memory_limit or default_memory_limit()
    limits = Limits(seconds=time_limit, cpu_seconds=time_limit, memory_bytes=memory)
    env = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(max_pixels)}
    return shared(("decode pool", max_pixels, limits),
                  lambda: IsolatedPool(_work, workers(), limits, env=env))


def run(op, datas: list[bytes], job: tuple, stages: tuple[str, str]) -> list:
    """Each input's uint8 image, or the Refused exception of a bad one. Bytes in no format
    beamzoo reads are refused here, from their first bytes, without a trip to a worker."""
    from beamzoo.core import error_text
    from beamzoo.transforms.preprocess import known_format
    out: list = [None] * len(datas)
    for i, data in enumerate(datas):
        try:
            known_format(data)
        except ValueError as exc:
            out[i] = Refused(error_text(exc), stages[0])
    todo = [i for i, o in enumerate(out) if o is None]
    p = op.params
    results = pool(job[0], p["time_limit"], p["memory_limit"]).map(
        (pickle.PickleBuffer(datas[i]), job) for i in todo)
    for i, r in zip(todo, results):
        if isinstance(r, IsolationFailure):
            out[i] = Refused(f"{r.kind}: {r.message}", stages[0])
        elif isinstance(r, tuple):
            out[i] = Refused(r[1], stages[r[0]])
        else:
            out[i] = r
    return out

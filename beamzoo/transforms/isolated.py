"""Decoding under per-input limits, in worker processes that can be killed.

A decode step hands each row's file bytes to a pool of worker processes
(``beamzoo.core.isolate``: one per core, shared by the step's threads in a
process). There the bytes are sniffed, decoded and, for the fused
decode+resize step, resized and cropped, so that only the small uint8 image
comes back. An input over the time limit (CPU time: a busy machine does not
make it fire; a worker that uses no CPU and does not answer is killed after
10 x that, at least 30 s, of wall time) or the memory limit is a dead letter
whose reason starts with ``timeout`` or ``memory`` (``crash`` if its decoder
crashed); the worker is replaced and the run goes on. The workers' OpenCV
refuses images over ``max_pixels`` itself (``OPENCV_IO_MAX_IMAGE_PIXELS``).
"""
from __future__ import annotations

import os
import pickle

import cv2
import numpy as np

from beamzoo.core.context import STANDALONE, RunContext
from beamzoo.core.isolate import _MEMORY_HINTS, IsolatedPool, IsolationFailure, Limits
from beamzoo.core.knobs import Knob
from beamzoo.core.op import error_text
from beamzoo.imaging import decode, decode_resized, decoder_threads, known_format

DEFAULT_TIME_LIMIT = 5.0
DEFAULT_MEMORY_CAP = 2 << 30
WALL_PER_CPU, WALL_MIN = 10.0, 30.0  # a worker stuck in the kernel (no CPU used) is killed after this

KNOBS = {
    "isolate": Knob(True, bool, results=False,
                    doc="decode in worker processes, under the time and memory limits (off: in the runner's own "
                        "process, without those two limits; reads keep their time limit)"),
    "time_limit": Knob(DEFAULT_TIME_LIMIT, float, low=0.01, results=False, unit="seconds",
                       doc="seconds one image may take to read (wall clock), and of CPU time to sniff and decode "
                           "(a busy machine does not make it fire); over it, it is a dead letter"),
    "memory_limit": Knob(None, int, low=64 << 20, results=False, unit="bytes",
                         doc="memory one image may take to decode, e.g. 512M or 2G; over it, it is a dead letter "
                             "(default 2G, or less on a machine with under 4G per core)"),
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
    data, (max_pixels, min_side, channels, resize) = item
    data = data.obj if isinstance(data, memoryview) else data  # the bytearray it was received into
    try:
        if resize:
            return decode_resized(data, max_pixels, min_side, *resize, channels)
        return np.ascontiguousarray(decode(data, max_pixels, min_side, channels))
    except Exception as exc:  # noqa: BLE001 - the dead letter's reason
        if isinstance(exc, MemoryError) or any(h in str(exc) for h in _MEMORY_HINTS):
            raise
        return getattr(exc, "part", 0), error_text(exc)


_threads_set = False


def _work(item):
    global _threads_set
    if not _threads_set:
        cv2.setNumThreads(1)  # one worker per core is the parallelism
        decoder_threads(1)
        _threads_set = True
    return work(item)


def pool(max_pixels: int, time_limit: float, memory_limit: int | None,
         ctx: RunContext = STANDALONE) -> IsolatedPool:
    """The process's pool for these limits (made on first use, warm from then on)."""
    memory = memory_limit or default_memory_limit()
    # The limit is CPU time: the same image is scored or refused however busy the machine is. A
    # worker that uses no CPU and does not answer (stuck in the kernel) goes after far longer.
    limits = Limits(seconds=max(WALL_MIN, WALL_PER_CPU * time_limit), cpu_seconds=time_limit, memory_bytes=memory)
    env = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(max_pixels)}
    return ctx.shared(("decode pool", max_pixels, limits),
                      lambda: IsolatedPool(_work, workers(), limits, env=env))


def run(op, datas: list[bytes], job: tuple, stages: tuple[str, str]) -> list:
    """Each input's uint8 image, or the Refused exception of a bad one. Bytes in no format
    beamzoo reads are refused here, from their first bytes, without a trip to a worker."""
    out: list = [None] * len(datas)
    for i, data in enumerate(datas):
        try:
            known_format(data)
        except ValueError as exc:
            out[i] = Refused(error_text(exc), stages[0])
    todo = [i for i, o in enumerate(out) if o is None]
    p = op.params
    results = pool(job[0], p["time_limit"], p["memory_limit"], op.ctx).map(
        (pickle.PickleBuffer(datas[i]), job) for i in todo)
    for i, r in zip(todo, results):
        if isinstance(r, IsolationFailure):
            out[i] = Refused(f"{r.kind}: {r.message}", stages[0])
        elif isinstance(r, tuple):
            out[i] = Refused(r[1], stages[r[0]])
        else:
            out[i] = r
    return out

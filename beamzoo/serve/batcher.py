"""Dynamic batching across requests: a bounded queue of rows and when to cut a batch.

``Batcher`` is a plain state machine with an injected clock: ``offer`` takes
all of a request's rows or none of them (the queue holds at most
``max_queue`` rows) and gives the request's key; ``take`` cuts a batch of up
to ``max_batch`` rows once that many wait, once the oldest has waited
``max_delay`` seconds, or once the batcher is closing. A batch is cut round
robin, one row of each waiting request in turn, so a request with many rows
cannot make one that came after it wait for all of them. ``drop`` forgets a
request's rows not yet taken (it timed out, or its client went away).
``BatchLoop`` runs it with worker threads; ``BatchLoop.set`` moves ``max_batch`` and
``max_delay`` while it runs (``--adapt``): the next cut reads them.
"""
from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    """The queue cannot take the request's rows now."""


class Closed(Exception):
    """The batcher is shutting down and takes no new rows."""


@dataclass
class Row:
    item: Any
    enqueued: float


@dataclass
class Batcher:
    max_batch: int
    max_delay: float
    max_queue: int
    clock: Callable[[], float] = time.monotonic
    waiting: dict = field(default_factory=dict)  # request key -> deque of its rows
    turns: deque = field(default_factory=deque)  # request keys, in round-robin order
    size: int = 0
    closing: bool = False
    keys: Any = field(default_factory=itertools.count)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.max_delay < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay >= 0")

    def offer(self, items: list) -> int:
        """Queue every item or none, as one request; its key (for ``drop``). ``QueueFull`` when
        they do not fit, ``Closed`` when closing."""
        if self.closing:
            raise Closed("the server is shutting down")
        if self.size + len(items) > self.max_queue:
            raise QueueFull(f"the queue holds {self.size} of at most {self.max_queue} rows; "
                            f"this request brings {len(items)}")
        key = next(self.keys)
        if items:
            now = self.clock()
            self.waiting[key] = deque(Row(i, now) for i in items)
            self.turns.append(key)
            self.size += len(items)
        return key

    def drop(self, key: int) -> int:
        """Forget the rows of request ``key`` not yet taken; how many there were."""
        rows = self.waiting.pop(key, None)
        if not rows:
            return 0
        self.turns.remove(key)
        self.size -= len(rows)
        return len(rows)

    def due_in(self) -> float | None:
        """Seconds until a batch is due (0: now), or None when nothing waits."""
        if not self.size:
            return None
        if self.closing or self.size >= self.max_batch:
            return 0.0
        oldest = min(rows[0].enqueued for rows in self.waiting.values())
        return max(0.0, oldest + self.max_delay - self.clock())

    def take(self) -> list[Row]:
        """The next batch if one is due, else []: one row of each waiting request in turn."""
        if self.due_in() != 0.0:
            return []
        batch = []
        while len(batch) < self.max_batch and self.turns:
            key = self.turns.popleft()
            rows = self.waiting[key]
            batch.append(rows.popleft())
            if rows:
                self.turns.append(key)
            else:
                del self.waiting[key]
        self.size -= len(batch)
        return batch

    def close(self) -> None:
        """Take no new rows; what waits is due at once."""
        self.closing = True

    def __len__(self):
        return self.size


class BatchLoop:
    """``workers`` threads that take due batches from a ``Batcher`` and hand each to
    ``run(rows, worker_index)`` (which answers the rows, whatever happens); ``close``
    answers what was accepted, then joins them."""

    def __init__(self, batcher: Batcher, run: Callable[[list[Row], int], None], workers: int = 1,
                 name: str = "beamzoo-batch"):
        self.batcher, self.run = batcher, run
        self.cv = threading.Condition()
        self.threads = [threading.Thread(target=self._loop, args=(i,), name=f"{name}-{i}", daemon=True)
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def offer(self, items: list) -> int:
        with self.cv:
            key = self.batcher.offer(items)
            self.cv.notify()
            return key

    def drop(self, key: int) -> int:
        with self.cv:
            return self.batcher.drop(key)

    def queued(self) -> int:
        with self.cv:
            return len(self.batcher)

    def set(self, max_batch: int | None = None, max_delay: float | None = None) -> None:
        """Cut the next batches at ``max_batch`` rows, or after ``max_delay`` seconds."""
        with self.cv:
            if max_batch is not None:
                if max_batch < 1:
                    raise ValueError(f"max_batch must be >= 1, got {max_batch}")
                self.batcher.max_batch = max_batch
            if max_delay is not None:
                if max_delay < 0:
                    raise ValueError(f"max_delay must be >= 0, got {max_delay}")
                self.batcher.max_delay = max_delay
            self.cv.notify_all()  # a batch may be due now

    def _loop(self, index: int) -> None:
        while True:
            with self.cv:
                while True:
                    wait = self.batcher.due_in()
                    if wait == 0.0:
                        rows = self.batcher.take()
                        break
                    if wait is None and self.batcher.closing:
                        return
                    self.cv.wait(wait)
                if self.batcher.due_in() == 0.0:
                    self.cv.notify()  # more is due: wake another worker
            try:
                self.run(rows, index)
            except BaseException as exc:  # noqa: BLE001 - ``run`` answers its rows; this thread must live on
                print(f"beamzoo serve: a batch failed outside the graph: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    def close(self, timeout: float | None = None) -> None:
        with self.cv:
            self.batcher.close()
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout)

"""A Redis stream of requests, as Cluster Serving has: clients enqueue, the server consumes.

A request is a stream entry ``{uri, data[, model]}`` (``data``: the encoded
image's bytes). The server reads the stream in a consumer group, runs the
rows through the same batcher as HTTP requests, and stores each answer in
the hash ``<stream>:result:<uri>`` (``value``: the prediction as JSON,
``answers``: how many times it was stored) in one transaction with the
entry's XACK and XDEL: an entry is acknowledged only with its result, so a
consumer killed before that leaves it pending, and the consumer started
again (same name; or any consumer once it has been idle ``claim_idle_s``)
answers it. ``QueueClient`` enqueues (refusing when Redis memory passes 60 %
of ``maxmemory``) and queries.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from beamzoo.serve.batcher import Closed, QueueFull

GROUP = "beamzoo"
MEMORY_LIMIT = 0.6  # of maxmemory: beyond it, enqueue refuses


def _redis(url: str):
    try:
        import redis
    except ImportError as exc:
        raise RuntimeError("the Redis queue needs the redis package: pip install 'beamzoo[serve]'") from exc
    return redis.Redis.from_url(url)


def result_key(stream: str, uri: str) -> str:
    return f"{stream}:result:{uri}"


class RedisQueueFull(RuntimeError):
    """Redis memory is nearly full: the client does not enqueue."""


class QueueClient:
    """``enqueue(uri, image=...)`` a request, ``query(uri)`` its answer."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", stream: str = "beamzoo"):
        self.redis, self.stream = _redis(url), stream

    def memory_used(self) -> float | None:
        """used_memory / maxmemory, or None when Redis has no maxmemory."""
        info = self.redis.info("memory")
        return info["used_memory"] / info["maxmemory"] if info.get("maxmemory") else None

    def enqueue(self, uri: str, image, model: str | None = None) -> str:
        """Queue an image (bytes or a path) under ``uri``; returns the stream entry id."""
        if not isinstance(uri, str) or not uri:
            raise ValueError("uri must be a non-empty string")
        used = self.memory_used()
        if used is not None and used > MEMORY_LIMIT:
            raise RedisQueueFull(f"Redis memory is {used:.0%} of maxmemory (over {MEMORY_LIMIT:.0%}): "
                                 "not enqueued; retry when the server has caught up")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            with open(os.fspath(image), "rb") as f:
                image = f.read()
        fields = {"uri": uri, "data": bytes(image)}
        if model:
            fields["model"] = model
        return self.redis.xadd(self.stream, fields).decode()

    def query(self, uri: str, timeout: float = 0.0, poll: float = 0.02) -> dict | None:
        """The answer for ``uri`` (a prediction, or ``{"error", "stage"}``), waiting up to
        ``timeout`` seconds; None if there is none yet."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.redis.hget(result_key(self.stream, uri), "value")
            if value is not None:
                return json.loads(value)
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)


class StreamConsumer:
    """A thread that serves a stream's entries through ``server``'s model services."""

    def __init__(self, server, url: str, stream: str, consumer: str | None = None, claim_idle_s: float = 30.0,
                 block_ms: int = 200):
        self.server, self.stream = server, stream
        self.redis = _redis(url)
        self.redis.ping()  # fails now, not in the thread, when Redis cannot be reached
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms, self.block_ms = int(claim_idle_s * 1000), block_ms
        self.count = max(s.loop.batcher.max_batch for s in server.services.values()) * server.workers
        self.answered = 0
        try:
            self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # noqa: BLE001 - the group exists already
            if "BUSYGROUP" not in str(exc):
                raise
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"beamzoo-redis-{stream}", daemon=True)
        self.thread.start()

    def _entries(self, pending: bool) -> list:
        got = self.redis.xreadgroup(GROUP, self.consumer, {self.stream: "0" if pending else ">"},
                                    count=self.count, block=None if pending else self.block_ms)
        return got[0][1] if got else []

    def _claimed(self) -> list:
        _, entries, *_ = self.redis.xautoclaim(self.stream, GROUP, self.consumer, self.claim_idle_ms,
                                               "0-0", count=self.count)
        return [e for e in entries if e[1]]

    def _loop(self) -> None:
        pending = True  # first what this consumer took and did not acknowledge before it stopped
        last_claim = 0.0
        while not self._stop.is_set():
            try:
                entries = self._entries(pending)
                if pending and not entries:
                    pending = False
                    continue
                if not entries and time.monotonic() - last_claim > 1.0:
                    last_claim = time.monotonic()
                    entries = self._claimed()  # a dead consumer's entries
                if entries:
                    self._serve(entries)
            except Exception as exc:  # noqa: BLE001 - Redis away for a while: wait, try again
                print(f"beamzoo serve: redis stream {self.stream}: {type(exc).__name__}: {exc}", flush=True)
                self._stop.wait(1.0)

    def _serve(self, entries: list) -> None:
        by_service: dict = {}
        answers: dict[bytes, dict] = {}
        for entry_id, fields in entries:
            uri = fields.get(b"uri", b"").decode("utf-8", "replace")
            data = fields.get(b"data")
            model = fields.get(b"model", b"").decode("utf-8", "replace") or None
            try:
                if not uri or not data:
                    raise ValueError("a queued request needs a uri and data")
                service = self.server.service_for(model)
            except (ValueError, LookupError) as exc:
                answers[entry_id] = (uri, {"error": str(exc), "stage": "request"})
                continue
            by_service.setdefault(service, []).append((entry_id, uri, data))
        for service, items in by_service.items():
            while True:
                try:
                    future = service.submit([d for _, _, d in items])
                    break
                except QueueFull:  # HTTP has filled the queue: wait, the entries stay ours
                    if self._stop.wait(0.05):
                        return
                except Closed:
                    return
            for (entry_id, uri, _), result in zip(items, future.result()):
                answers[entry_id] = (uri, result)
        pipe = self.redis.pipeline(transaction=True)
        for entry_id, (uri, result) in answers.items():
            key = result_key(self.stream, uri or entry_id.decode())
            pipe.hset(key, "value", json.dumps(result))
            pipe.hincrby(key, "answers", 1)
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
        pipe.execute()
        self.answered += len(answers)

    def close(self, timeout: float | None = 30.0) -> None:
        """Read no more; what is in hand is answered and acknowledged first."""
        self._stop.set()
        self.thread.join(timeout)

"""A Redis stream of requests, as Cluster Serving has: clients enqueue, the server consumes.

A request is a stream entry ``{uri, data[, model]}`` (``data``: the encoded
image's bytes). The server reads the stream in a consumer group, runs the
rows through the same batcher as HTTP requests, and stores each answer in
the hash ``<stream>:result:<uri>`` (``value``: the prediction as JSON,
``answers``: how many times it was stored) in one transaction with the
entry's XACK and XDEL: an entry is acknowledged only with its result, so a
consumer killed before that leaves it pending, and the consumer started
again (same name; or any consumer once it has been idle ``claim_idle_s``)
answers it. Entries for a model version retired just as they were queued
go to the version now served. ``QueueClient`` enqueues (refusing when Redis
memory passes 60 % of ``maxmemory``) and queries.

Entries are capped as HTTP bodies are (the server's ``max_body_bytes``): a
script in Redis reads them one by one and replaces a larger entry's data by
its size, so a huge entry never leaves Redis; it is answered with an error.
A read takes at most ``count`` entries and stops once it holds
``max_body_bytes``. Redis away: the consumer is not ready, retries with a
backoff of up to 2 s, and logs one line when it goes and one when it is back;
a Redis that comes back empty (restarted without persistence) gets its
consumer group again.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from beamzoo.serve.batcher import Closed, QueueFull
from beamzoo.serve.knobs import SERVER_KNOBS

GROUP = "beamzoo"
MEMORY_LIMIT = 0.6  # of maxmemory: beyond it, enqueue refuses
MAX_BYTES = SERVER_KNOBS["max_body_bytes"].default
BACKOFF_S = (0.05, 2.0)  # first and longest wait between tries while Redis is away

# KEYS[1] stream; ARGV group, consumer, mode (">" new entries, "0" this consumer's pending ones,
# "claim" entries idle ARGV[7] ms), count, byte budget of the read, byte cap of an entry.
_READ = """
local stream, group, consumer, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local count, budget, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out, bytes, after, steps = {}, 0, '0-0', 0
local function take(entry)
  local fields = entry[2]
  if fields then
    local size = 0
    for i = 1, #fields do size = size + #fields[i] end
    if size > cap then
      local kept = {'oversize', tostring(size)}
      for i = 1, #fields, 2 do
        if (fields[i] == 'uri' or fields[i] == 'model') and #fields[i + 1] <= 1024 then
          kept[#kept + 1] = fields[i]
          kept[#kept + 1] = fields[i + 1]
        end
      end
      entry, size = {entry[1], kept}, 0
      for i = 1, #kept do size = size + #kept[i] end
    end
    bytes = bytes + size
  end
  out[#out + 1] = entry
end
while #out < count and bytes < budget and steps < 10 * count do
  steps = steps + 1
  if mode == 'claim' then
    local got = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[7], after, 'COUNT', 1)
    after = got[1]
    if got[2][1] then take(got[2][1]) end
    if after == '0-0' then break end
  else
    local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream,
                           mode == '0' and after or '>')
    local entry = got and got[1][2][1]
    if not entry then break end
    after = entry[1]
    take(entry)
  end
end
return out
"""


def _redis(url: str, **kwargs):
    try:
        import redis
    except ImportError as exc:
        raise RuntimeError("the Redis queue needs the redis package: pip install 'beamzoo[serve]'") from exc
    return redis.Redis.from_url(url, **kwargs)


def result_key(stream: str, uri: str) -> str:
    return f"{stream}:result:{uri}"


def backoff_s(failures: int) -> float:
    """The wait after ``failures`` tries in a row that failed: doubling, at most ``BACKOFF_S[1]``."""
    first, longest = BACKOFF_S
    return min(longest, first * 2 ** min(max(failures - 1, 0), 16))


class RedisQueueFull(RuntimeError):
    """Redis memory is nearly full: the client does not enqueue."""


class QueueClient:
    """``enqueue(uri, image=...)`` a request, ``query(uri)`` its answer. ``max_bytes``: the
    largest entry it enqueues (the server's ``max_body_bytes``; larger ones the server refuses)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", stream: str = "beamzoo", max_bytes: int = MAX_BYTES):
        self.redis, self.stream, self.max_bytes = _redis(url), stream, max_bytes

    def memory_used(self) -> float | None:
        """used_memory / maxmemory, or None when Redis has no maxmemory."""
        info = self.redis.info("memory")
        return info["used_memory"] / info["maxmemory"] if info.get("maxmemory") else None

    def enqueue(self, uri: str, image, model: str | None = None) -> str:
        """Queue an image (bytes or a path) under ``uri``; returns the stream entry id."""
        if not isinstance(uri, str) or not uri:
            raise ValueError("uri must be a non-empty string")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            with open(os.fspath(image), "rb") as f:
                image = f.read()
        fields = {"uri": uri, "data": bytes(image)}
        if model:
            fields["model"] = model
        size = sum(len(k) + len(v if isinstance(v, bytes) else v.encode()) for k, v in fields.items())
        if size > self.max_bytes:
            raise ValueError(f"the entry is {size} bytes, over the limit of {self.max_bytes} (max_bytes, "
                             "the server's --max_body_bytes): not enqueued; send a smaller image")
        used = self.memory_used()
        if used is not None and used > MEMORY_LIMIT:
            raise RedisQueueFull(f"Redis memory is {used:.0%} of maxmemory (over {MEMORY_LIMIT:.0%}): "
                                 "not enqueued; retry when the server has caught up")
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
    """A thread that serves a stream's entries through ``server``'s model services.

    ``ready``: whether its last round trip to Redis worked. ``poll_ms``: the longest
    wait between reads while the stream is empty (reads follow each other at once
    while there are entries)."""

    def __init__(self, server, url: str, stream: str, consumer: str | None = None, claim_idle_s: float = 30.0,
                 poll_ms: float = 10.0):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.server, self.stream = server, stream
        # this loop retries, with its own backoff
        self.redis = _redis(url, retry=Retry(NoBackoff(), 0), socket_timeout=10, socket_connect_timeout=5)
        self.redis.ping()  # fails now, not in the thread, when Redis cannot be reached
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms, self.poll_s = int(claim_idle_s * 1000), poll_ms / 1000
        self.count = server.max_batch * server.workers
        self.max_bytes = server.max_body_bytes
        self.answered = 0
        self.ready = True
        self._read_script = self.redis.register_script(_READ)
        self._create_group()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"beamzoo-redis-{stream}", daemon=True)
        self.thread.start()

    def _create_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # noqa: BLE001 - the group exists already
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, mode: str) -> list:
        """Up to ``count`` entries as ``(id, fields)`` (fields None: deleted meanwhile)."""
        got = self._read_script(keys=[self.stream], args=[GROUP, self.consumer, mode, self.count, self.max_bytes,
                                                          self.max_bytes, self.claim_idle_ms])
        return [(e[0], dict(zip(e[1][::2], e[1][1::2])) if e[1] is not None else None) for e in got]

    def _loop(self) -> None:
        pending = True  # first what this consumer took and did not acknowledge before it stopped
        last_claim, idle, failures = 0.0, 0, 0
        while not self._stop.is_set():
            try:
                entries = self._read("0" if pending else ">")
                if not entries and not pending and time.monotonic() - last_claim > 1.0:
                    last_claim = time.monotonic()
                    entries = self._read("claim")  # a dead consumer's entries
                if failures:
                    print(f"beamzoo serve: redis stream {self.stream}: reachable again; ready", flush=True)
                    failures, self.ready = 0, True
                if entries:
                    idle = 0
                    self._serve(entries)
                elif pending:
                    pending = False
                else:
                    idle += 1
                    self._stop.wait(min(self.poll_s, 0.001 * 2 ** min(idle, 16)))
            except Exception as exc:  # noqa: BLE001 - Redis away for a while: wait, try again
                if "NOGROUP" in str(exc) and self._group_again():
                    continue
                failures += 1
                if failures == 1:
                    self.ready = False
                    print(f"beamzoo serve: redis stream {self.stream}: {type(exc).__name__}: {str(exc)[:300]}; "
                          f"not ready, trying again every {BACKOFF_S[1]:g} s at most", flush=True)
                pending = True  # entries in hand stay pending: read them again first
                self._stop.wait(backoff_s(failures))

    def _group_again(self) -> bool:
        """Redis lost the stream or its group (restarted without persistence): make them again."""
        try:
            self._create_group()
        except Exception:  # noqa: BLE001 - Redis away again: the loop's backoff handles it
            return False
        print(f"beamzoo serve: redis stream {self.stream}: consumer group {GROUP!r} was gone; created again",
              flush=True)
        return True

    def _serve(self, entries: list) -> None:
        by_model: dict = {}
        answers: dict[bytes, dict] = {}
        gone = [entry_id for entry_id, fields in entries if fields is None]
        for entry_id, fields in entries:
            if fields is None:
                continue
            uri = fields.get(b"uri", b"").decode("utf-8", "replace")
            data = fields.get(b"data")
            model = fields.get(b"model", b"").decode("utf-8", "replace") or None
            try:
                if b"oversize" in fields:
                    raise ValueError(f"the entry is {int(fields[b'oversize'])} bytes, over the limit of "
                                     f"{self.max_bytes} bytes (--max_body_bytes); send a smaller image")
                if not uri or not data:
                    raise ValueError("a queued request needs a uri and data")
            except ValueError as exc:
                answers[entry_id] = (uri, {"error": str(exc), "stage": "request"})
                continue
            by_model.setdefault(model, []).append((entry_id, uri, data))
        queued = []
        for model, items in by_model.items():
            try:
                future = self._submit(model, [d for _, _, d in items])
            except LookupError as exc:  # no such model (or version) is served
                answers.update((e, (uri, {"error": str(exc), "stage": "request"})) for e, uri, _ in items)
                continue
            if future is not None:  # else the server stops: these entries stay pending
                queued.append((items, future))
        for items, future in queued:
            for (entry_id, uri, _), result in zip(items, future.result()):
                answers[entry_id] = (uri, result)
        pipe = self.redis.pipeline(transaction=True)
        for entry_id, (uri, result) in answers.items():
            key = result_key(self.stream, uri or entry_id.decode())
            pipe.hset(key, "value", json.dumps(result))
            pipe.hincrby(key, "answers", 1)
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
        for entry_id in gone:  # deleted while pending: nothing to answer
            pipe.xack(self.stream, GROUP, entry_id)
        pipe.execute()
        self.answered += len(answers)

    def _submit(self, model: str | None, data: list[bytes]):
        """The future of ``data`` queued for ``model`` (``name[:version]``), or None once the server
        stops. A version retired between the lookup and the queueing is looked up again: its
        entries move to the version now served. Raises ``LookupError`` when no version serves."""
        closed = 0
        while True:
            service = self.server.service_for(model)
            try:
                return service.submit(data)
            except QueueFull:  # HTTP has filled the queue: wait, the entries stay ours
                if self._stop.wait(0.05):
                    return None
            except Closed:
                closed += 1
                if self.server.closed or closed == 3:  # the server stops, not a version swapped out
                    return None

    def close(self, timeout: float | None = 30.0) -> None:
        """Read no more; what is in hand is answered and acknowledged first."""
        self._stop.set()
        self.thread.join(timeout)

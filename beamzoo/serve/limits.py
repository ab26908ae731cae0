"""What a client may hold of the server: time to send a request, connections, bytes in flight.

uvicorn bounds neither the time a client takes to send a request's head nor
the number of connections it answers (its ``limit_concurrency`` answers 503
without ``Retry-After``), so ``Guarded`` is its HTTP/1.1 protocol with:

* a head deadline: a connection that has not sent a whole request head
  ``header_timeout_s`` after it opened, or after the first byte of a next
  request on a kept-alive connection (or after the rest of an answered
  body came), gets 408 and is closed; an idle kept-alive connection is
  closed after uvicorn's ``timeout_keep_alive``;
* a body deadline for a body the app answered without reading (a refusal,
  a GET with a body): the rest may still come, and is thrown away, until
  ``body_timeout_s`` after the head; then the connection is closed (the app
  itself answers 408 to a body it is reading that comes too slowly);
* a cap: every request on a connection opened while ``max_connections``
  are open gets 503 with ``Retry-After`` and the connection is closed.

``ByteBudget`` bounds the bytes of request bodies being read or waiting for
their answer, across requests; a request that would pass it is refused. (A
body's JSON and its decoded images take about as much again while the
request waits; uvicorn buffers at most about 64 KiB of a body per
connection before the app reads it.)
"""
from __future__ import annotations

import json
import threading

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

RETRY_AFTER_S = 1  # what refusals for the server's sake tell a client to wait


class Busy(Exception):
    """The server holds as many bytes of bodies as it may: the request is refused."""


class ByteBudget:
    """Bytes of request bodies held at most, across HTTP and gRPC; ``hold()`` is one request's
    share."""

    def __init__(self, limit: int, gauge=None):
        self.limit, self.used, self.gauge = limit, 0, gauge
        self.lock = threading.Lock()  # the event loop and gRPC's threads both take and release

    def hold(self) -> Hold:
        return Hold(self)

    def _add(self, n: int) -> None:
        self.used += n
        if self.gauge is not None:
            self.gauge.set(self.used)


class Hold:
    """The bytes one request holds, given back by ``release``."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.bytes = budget, 0

    def take(self, n: int) -> None:
        b = self.budget
        with b.lock:
            if b.used + n > b.limit:
                raise Busy(f"the server holds {b.used} bytes of request bodies, at most {b.limit} "
                           f"(--max_inflight_bytes), and this request brings {self.bytes + n}")
            b._add(n)
            self.bytes += n

    def release(self) -> None:
        with self.budget.lock:
            self.budget._add(-self.bytes)
            self.bytes = 0


class Limits:
    """What ``Guarded`` enforces, and where it counts what it does (a ``Metrics``)."""

    def __init__(self, header_timeout_s: float, body_timeout_s: float, max_connections: int, metrics=None):
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.max_connections, self.metrics = max_connections, metrics

    def closed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.closed.labels(reason).inc()

    def open_now(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.connections.set(n)

    async def over_capacity(self, scope, receive, send) -> None:
        """The app of a connection opened past the cap."""
        body = json.dumps({"error": f"the server has {self.max_connections} connections open, its most "
                                    "(--max_connections); retry later"}).encode()
        self.closed("over_capacity")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Guarded(H11Protocol):
    """uvicorn's h11 protocol under ``Limits`` (see the module's doc)."""

    def __init__(self, *args, limits: Limits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._timer, self._timer_for = None, None  # the deadline running now: "head" or "body"
        self._body_of, self._body_due = None, 0.0  # the request whose body is coming, and its deadline

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.limits.open_now(len(self.connections))
        if len(self.connections) > self.limits.max_connections:
            self.app = self.limits.over_capacity
        self._arm("head", self.limits.header_timeout_s)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
        self.limits.open_now(len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self._timer is None and self.conn.their_state is h11.IDLE:  # the first byte of a next request
            self._arm("head", self.limits.header_timeout_s)
        super().data_received(data)
        self._moved_on()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        self._moved_on()
        state = self.conn.their_state
        if state is h11.IDLE and self._timer is None and self.conn.trailing_data[0]:
            self._arm("head", self.limits.header_timeout_s)  # part of a pipelined head waits
        elif state is h11.SEND_BODY and self._timer is None:  # answered before its body came
            self._arm("body", max(0.0, self._body_due - self.loop.time()))

    def _moved_on(self) -> None:
        """After the parser took what came: a head that came ends its deadline and starts its
        body's; a body that came ends its deadline."""
        state = self.conn.their_state
        if state is not h11.IDLE and self._timer_for == "head":
            self._disarm()
        if state is h11.SEND_BODY and self._body_of is not self.cycle:
            self._body_of, self._body_due = self.cycle, self.loop.time() + self.limits.body_timeout_s
        if state is not h11.SEND_BODY and self._timer_for == "body":
            self._disarm()
            if state is h11.IDLE:  # the rest of an answered body came: the next head's deadline
                self._arm("head", self.limits.header_timeout_s)

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._late)
        self._timer_for = what

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_for = None, None

    def _late(self) -> None:
        what = self._timer_for
        self._timer, self._timer_for = None, None
        if self.transport.is_closing():
            return
        if what == "head" and self.conn.their_state is h11.IDLE:
            self.limits.closed("header_timeout")
            self.transport.write(TIMED_OUT)
            self.transport.close()
        elif what == "body" and self.conn.their_state is h11.SEND_BODY:
            self.limits.closed("body_timeout")
            self.transport.close()


__all__ = ["Busy", "ByteBudget", "Guarded", "Limits", "RETRY_AFTER_S"]

"""A server: models loaded, one batching service each, the app on uvicorn.

``Server.run`` serves in this thread until SIGTERM/SIGINT (uvicorn stops
taking connections, answers what it accepted, then the services drain);
``Server.start`` serves from a background thread (tests, the benchmark).
uvicorn runs its h11 protocol under the server's limits on clients
(``beamzoo.serve.limits``: head and body deadlines, a connection cap).
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import threading
import time

from beamzoo.core.knobs import bind, declare
from beamzoo.serve.app import make_app
from beamzoo.serve.knobs import SERVER_KNOBS
from beamzoo.serve.limits import ByteBudget, Guarded, Limits
from beamzoo.serve.metrics import Metrics
from beamzoo.serve.models import Catalog, Servable
from beamzoo.serve.redis_queue import StreamConsumer
from beamzoo.serve.service import ModelService


class Server:
    """Serves ``servables`` (each a model's graph); its knobs are the batching and the limits."""

    knobs = SERVER_KNOBS

    def __init__(self, servables: list[Servable], **knobs):
        p = bind(type(self).__name__, self.knobs, (), (), knobs)
        max_batch, max_delay_ms, max_queue = p["max_batch"], p["max_delay_ms"], p["max_queue"]
        max_body_bytes, workers, timeout_s = p["max_body_bytes"], p["workers"], p["timeout_s"]
        if not servables:
            raise ValueError("nothing to serve: give --model NAME[:V] or --bundle DIR")
        if p["max_inflight_bytes"] < max_body_bytes:
            raise ValueError(f"--max_inflight_bytes ({p['max_inflight_bytes']}) is below --max_body_bytes "
                             f"({max_body_bytes}): no body that large could be read; raise it")
        self.catalog = Catalog(servables)
        self.metrics = Metrics()
        self.max_queue, self.max_body_bytes, self.timeout_s = max_queue, max_body_bytes, timeout_s
        self.body_timeout_s = p["body_timeout_s"]
        self.limits = Limits(p["header_timeout_s"], p["body_timeout_s"], p["max_connections"], self.metrics)
        self.inflight = ByteBudget(p["max_inflight_bytes"], self.metrics.inflight)
        self.workers = workers or os.cpu_count() or 1
        self.services = {(s.name, s.version): ModelService(s, self.metrics, max_batch, max_delay_ms / 1000,
                                                           max_queue, self.workers)
                         for s in self.catalog}
        self.consumers = []
        self._closed = False
        self.app = make_app(self)

    @property
    def ready(self) -> bool:
        """Not closed, and every Redis stream it reads is reachable."""
        return not self._closed and all(c.ready for c in self.consumers)

    @property
    def closed(self) -> bool:
        return self._closed

    def lookup(self, name: str, version: str | None = None) -> tuple[Servable, ModelService]:
        """The servable of ``name`` (its newest version) or ``name:version`` and its service;
        raises ``UnknownServable``."""
        s = self.catalog.get(name, version)
        return s, self.services[(s.name, s.version)]

    def service_for(self, model: str | None = None) -> ModelService:
        """The service of ``name[:version]``; without a name, the only model served."""
        if model is None:
            if len(self.services) != 1:
                raise LookupError(f"this server serves {len(self.services)} models: name one "
                                  f"({', '.join(f'{n}:{v}' for n, v in self.services)})")
            return next(iter(self.services.values()))
        name, _, version = model.partition(":")
        return self.lookup(name, version or None)[1]

    def consume(self, url: str, stream: str, consumer: str | None = None, claim_idle_s: float = 30.0):
        """Also serve the requests of a Redis stream (``beamzoo.serve.redis_queue``)."""
        c = StreamConsumer(self, url, stream, consumer, claim_idle_s)
        self.consumers.append(c)
        return c

    def close(self) -> None:
        """Answer what was accepted (stream entries in hand first), then stop."""
        if not self._closed:
            self._closed = True
            for c in self.consumers:
                c.close()
            for s in self.services.values():
                s.close()

    def _uvicorn(self, sock: socket.socket):
        import uvicorn

        class Uvicorn(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                """SIGTERM/SIGINT start the graceful stop; the process then exits 0 (uvicorn
                would raise the signal again once stopped)."""
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
                try:
                    yield
                finally:
                    for sig, handler in old.items():
                        signal.signal(sig, handler)

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                http=functools.partial(Guarded, limits=self.limits),
                                timeout_graceful_shutdown=self.timeout_s, timeout_keep_alive=30)
        return Uvicorn(config)

    def run(self, host: str = "127.0.0.1", port: int = 8501, announce=sys.stderr) -> None:
        """Serve until SIGTERM or SIGINT; prints where it listens."""
        sock = listen(host, port)
        server = self._uvicorn(sock)
        print(f"beamzoo serve: listening on http://{_url_host(host)}:{sock.getsockname()[1]} "
              f"({', '.join(s.name + ':' + s.version for s in self.catalog)})", file=announce, flush=True)
        server.run(sockets=[sock])
        self.close()
        print("beamzoo serve: stopped", file=announce, flush=True)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Running:
        """Serve from a background thread; ``Running.stop()`` ends it."""
        sock = listen(host, port)
        server = self._uvicorn(sock)
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="beamzoo-serve", daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while not server.started and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("the server did not start")
        return Running(self, server, t, f"http://{_url_host(host)}:{sock.getsockname()[1]}")


declare(Server, extra=(), lead=("servables",))


class Running:
    def __init__(self, server: Server, uv, thread: threading.Thread, url: str):
        self.server, self._uv, self._thread, self.url = server, uv, thread, url

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(60)
        self.server.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError says why not (port taken, no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock

"""A server: models loaded, one batching service each, the app on uvicorn.

``Server.run`` serves in this thread until SIGTERM/SIGINT (uvicorn stops
taking connections, answers what it accepted, then the services drain);
``Server.start`` serves from a background thread (tests, the benchmark).
uvicorn runs its h11 protocol under the server's limits on clients
(``beamzoo.serve.limits``: head and body deadlines, a connection cap).
What it serves may change while it serves: ``load`` adds a version,
``unload`` retires one (queued requests are answered first), ``watch``
follows a model repository folder (``beamzoo.serve.repository``).
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

from prometheus_client import Counter

from beamzoo.core.adapt import check_budgets
from beamzoo.core.knobs import Knob, bind, declare
from beamzoo.serve.app import make_app
from beamzoo.serve.knobs import SERVER_KNOBS
from beamzoo.serve.limits import ByteBudget, Guarded, Limits
from beamzoo.serve.metrics import Metrics
from beamzoo.serve.batcher import Closed
from beamzoo.serve.models import Catalog, Servable
from beamzoo.serve.redis_queue import StreamConsumer
from beamzoo.serve.repository import Repository
from beamzoo.serve.service import ModelService


class Server:
    """Serves ``servables`` (each a model's graph; none at first is fine where ``load`` or a
    watched repository adds them); its knobs are the batching and the limits. With ``adapt``
    each model's batching moves to keep its steps within ``budgets`` (``ModelService``), each
    change on stderr and counted in ``beamzoo_adapt_changes{model,knob}``."""

    knobs = {**SERVER_KNOBS,  # budgets come from a tuned config (--config), not from a flag
             "budgets": Knob(None, dict, results=False,
                             doc="{step id: latency budget, seconds per row} that adapt keeps each served "
                                 "step to (without them: 1.5 x its first batches)")}

    def __init__(self, servables: list[Servable], **knobs):
        p = bind(type(self).__name__, self.knobs, (), (), knobs)
        max_batch, max_delay_ms, max_queue = p["max_batch"], p["max_delay_ms"], p["max_queue"]
        max_body_bytes, workers, timeout_s = p["max_body_bytes"], p["workers"], p["timeout_s"]
        if p["max_inflight_bytes"] < max_body_bytes:
            raise ValueError(f"--max_inflight_bytes ({p['max_inflight_bytes']}) is below --max_body_bytes "
                             f"({max_body_bytes}): no body that large could be read; raise it")
        Catalog(servables)  # a version given twice is refused before any model loads
        self.metrics = Metrics()
        self.max_batch, self.max_queue, self.max_body_bytes = max_batch, max_queue, max_body_bytes
        self.timeout_s = timeout_s
        self.body_timeout_s = p["body_timeout_s"]
        self.limits = Limits(p["header_timeout_s"], p["body_timeout_s"], p["max_connections"], self.metrics)
        self.inflight = ByteBudget(p["max_inflight_bytes"], self.metrics.inflight)
        self.workers = workers or os.cpu_count() or 1
        self._batching = (max_batch, max_delay_ms / 1000, max_queue, self.workers)
        self.adapt, self.budgets = p["adapt"], check_budgets(type(self).__name__, p["budgets"])
        if self.adapt:
            self.adapt_changes = Counter("beamzoo_adapt_changes", "Changes adapt made to a model's batching, by "
                                         "model and knob", ["model", "knob"], registry=self.metrics.registry)
        self.catalog = Catalog()
        for s in servables:
            self.catalog.add(s, self._service(s))
        self.consumers = []
        self.repository = None
        self._changes = threading.Lock()  # load, unload and close, one at a time
        self._retiring: list[threading.Thread] = []  # services answering what they had queued
        self._closed = False
        self.app = make_app(self)

    def _service(self, servable: Servable) -> ModelService:
        if not self.adapt:
            return ModelService(servable, self.metrics, *self._batching)

        def changed(change, model=servable.name):
            self.adapt_changes.labels(model, change.knob).inc()
        return ModelService(servable, self.metrics, *self._batching, adapt=True, budgets=self.budgets,
                            on_change=changed)

    @property
    def ready(self) -> bool:
        """Not closed, and every Redis stream it reads is reachable."""
        return not self._closed and all(c.ready for c in self.consumers)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def services(self) -> dict[tuple[str, str], ModelService]:
        """The service of each (name, version) served now."""
        return {(s.name, s.version): service for s, service in self.catalog.entries()}

    def lookup(self, name: str, version: str | None = None) -> tuple[Servable, ModelService]:
        """The servable of ``name`` (its newest version) or ``name:version`` and its service;
        raises ``UnknownServable``."""
        return self.catalog.entry(name, version)

    def service_for(self, model: str | None = None) -> ModelService:
        """The service of ``name[:version]``; without a name, the only model served."""
        if model is None:
            services = self.services
            if not services:
                raise LookupError("this server serves no model now")
            if len(services) != 1:
                raise LookupError(f"this server serves {len(services)} models: name one "
                                  f"({', '.join(f'{n}:{v}' for n, v in services)})")
            return next(iter(services.values()))
        name, _, version = model.partition(":")
        return self.lookup(name, version or None)[1]

    def load(self, servable: Servable) -> ModelService:
        """Serve ``servable`` too: its model is loaded before any request can find it, and then
        its name alone means it if it is the newest version. Raises ``ValueError`` for a version
        served already, ``Closed`` once the server stops."""
        service = self._service(servable)
        with self._changes:
            try:
                if self._closed:
                    raise Closed("the server is shutting down")
                self.catalog.add(servable, service)
            except BaseException:
                service.close()
                raise
        return service

    def unload(self, name: str, version: str | None = None) -> list[Servable]:
        """Stop serving ``name:version`` (every version of ``name`` without one): new requests no
        longer find it (one naming it exactly gets 404; the name alone moves to the newest
        version left), those already queued are answered while its service closes in the
        background. Raises ``UnknownServable``."""
        with self._changes:
            taken = self.catalog.remove(name, version)
            self._retiring = [t for t in self._retiring if t.is_alive()]
            for s, service in taken:
                t = threading.Thread(target=service.close, name=f"beamzoo-retire-{s.name}-{s.version}", daemon=True)
                t.start()
                self._retiring.append(t)
        return [s for s, _ in taken]

    def watch(self, folder, only=None, model_knobs: dict | None = None, **knobs) -> Repository:
        """Also serve the versions of a model repository folder, following it as they come and go
        (``beamzoo.serve.repository``); ``knobs``: its ``poll_s``."""
        if self.repository is not None:
            raise ValueError(f"this server watches the repository {self.repository.folder} already")
        self.repository = Repository(self, folder, only=only, model_knobs=model_knobs, **knobs)
        return self.repository

    def consume(self, url: str, stream: str, consumer: str | None = None, claim_idle_s: float = 30.0):
        """Also serve the requests of a Redis stream (``beamzoo.serve.redis_queue``)."""
        c = StreamConsumer(self, url, stream, consumer, claim_idle_s)
        self.consumers.append(c)
        return c

    def close(self) -> None:
        """Answer what was accepted (stream entries in hand first), then stop."""
        with self._changes:
            if self._closed:
                return
            self._closed = True
        if self.repository is not None:
            self.repository.close()
        for c in self.consumers:
            c.close()
        for _, service in self.catalog.entries():
            service.close()
        for t in self._retiring:
            t.join()

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

    def run(self, host: str = "127.0.0.1", port: int = 8501, announce=sys.stderr,
            grpc_port: int | None = None) -> None:
        """Serve until SIGTERM or SIGINT; prints where it listens. ``grpc_port``: also serve
        KServe v2 over gRPC there (0: a free port)."""
        sock = listen(host, port)
        try:
            grpc = self._grpc(host, grpc_port)  # a taken port fails before anything is served
        except OSError:
            sock.close()
            raise
        server = self._uvicorn(sock)
        served = ", ".join(s.name + ":" + s.version for s in self.catalog) or "no model yet"
        watched = f"; repository {self.repository}" if self.repository is not None else ""
        also = f" and gRPC on {grpc.url}" if grpc is not None else ""
        print(f"beamzoo serve: listening on http://{_url_host(host)}:{sock.getsockname()[1]}{also} "
              f"({served}{watched})", file=announce, flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            if grpc is not None:
                grpc.stop(self.timeout_s)  # calls running get their answers
        self.close()
        print("beamzoo serve: stopped", file=announce, flush=True)

    def start(self, host: str = "127.0.0.1", port: int = 0, grpc_port: int | None = None) -> Running:
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
        try:
            grpc = self._grpc(host, grpc_port)
        except OSError:
            Running(self, server, t, "").stop()
            raise
        return Running(self, server, t, f"http://{_url_host(host)}:{sock.getsockname()[1]}", grpc)

    def _grpc(self, host: str, port: int | None):
        if port is None:
            return None
        from beamzoo.serve.grpc_service import start_grpc  # grpc is loaded only where it is served
        return start_grpc(self, host, port)


declare(Server, extra=(), lead=("servables",))


class Running:
    """A server serving from a background thread: ``url`` (HTTP), ``grpc`` (its ``GrpcHandle``
    or None), ``stop()``."""

    def __init__(self, server: Server, uv, thread: threading.Thread, url: str, grpc=None):
        self.server, self._uv, self._thread, self.url, self.grpc = server, uv, thread, url, grpc

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(60)
        if self.grpc is not None:
            self.grpc.stop(5)
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

"""One served model: its batcher, its worker threads, and the engine each runs.

``submit`` queues a request's instances (all or none) and returns a future of
one result per instance: the answer's fields, or ``{"error", "stage"}``;
cancelling the future (the request timed out, its client went away) drops
its rows not yet run from the queue. Each
worker thread runs the served plan with the in-thread runner's ``Engine``, in
one run context whose hook turns every step's metrics into Prometheus series.
With ``adapt`` an ``Adapter`` (``beamzoo.core.adapt``) in that context keeps each
step within its latency budget by moving the batcher's ``max_batch`` and
``max_delay`` within the values their knobs declare; ``on_change`` hears of
each change (the server counts them in ``beamzoo_adapt_changes``).
"""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Callable

import pyarrow as pa

from beamzoo.core.adapt import Adapter, Change, Lever
from beamzoo.core.context import RunContext
from beamzoo.core.op import error_text
from beamzoo.runners.inline import Engine
from beamzoo.serve.batcher import BatchLoop, Batcher, Row
from beamzoo.serve.graph import REQUEST_SCHEMA, answer_schema
from beamzoo.serve.knobs import SERVER_KNOBS
from beamzoo.serve.metrics import Metrics, StepSeries
from beamzoo.serve.models import Servable

_ids = iter(range(1 << 62))
_ids_lock = threading.Lock()


def _next_id() -> int:
    with _ids_lock:
        return next(_ids)


class Ticket:
    """The rows of one request, answered as they come back."""

    def __init__(self, n: int):
        self.results: list = [None] * n
        self.left = n
        self.lock = threading.Lock()
        self.future: Future = Future()

    def answer(self, index: int, result: dict) -> None:
        with self.lock:
            self.results[index] = result
            self.left -= 1
            done = self.left == 0
        if done:
            try:
                self.future.set_result(self.results)
            except InvalidStateError:  # cancelled: the request timed out or its client went away
                pass


class ModelService:
    def __init__(self, servable: Servable, metrics: Metrics, max_batch: int = 8, max_delay: float = 0.005,
                 max_queue: int = 256, workers: int = 1, clock=time.monotonic, adapt: bool = False,
                 budgets: dict | None = None, on_change: Callable[[Change], None] | None = None):
        self.servable, self.metrics, self.clock = servable, metrics, clock
        self.label = servable.name
        self.ctx = RunContext(f"serve-{servable.name}-{servable.version}", hooks=[StepSeries(metrics, self.label)],
                              holds=True)  # a version retired gives its sessions back
        self.engines = [Engine(servable.plan, self.ctx) for _ in range(workers)]  # models load here
        self.schema = answer_schema(servable.plan)  # the answer fields
        self.fields = self.schema.names
        self.loop = BatchLoop(Batcher(max_batch, max_delay, max_queue, clock), self._run, workers,
                              name=f"beamzoo-{servable.name}")
        self.adapter = None
        if adapt:
            loop = self.loop
            levers = [Lever("max_batch", SERVER_KNOBS["max_batch"], max_batch, lambda v: loop.set(max_batch=v)),
                      Lever("max_delay_ms", SERVER_KNOBS["max_delay_ms"], round(max_delay * 1000, 6),
                            lambda v: loop.set(max_delay=v / 1000))]
            self.adapter = Adapter(levers, budgets, say=self._say, on_change=[on_change] if on_change else ())
            self.adapter.known(s.id for s in servable.plan.graph.steps)
            self.ctx.hooks.append(self.adapter)

    def _say(self, line: str) -> None:
        print(f"beamzoo serve: {self.label}:{self.servable.version}: {line}", file=sys.stderr, flush=True)

    def submit(self, instances: list[bytes]) -> Future:
        """Queue the instances; raises ``QueueFull`` or ``Closed`` at once when they cannot wait."""
        ticket = Ticket(len(instances))
        if not instances:
            ticket.future.set_result([])
            return ticket.future
        rid = _next_id()
        key = self.loop.offer([(ticket, i, f"req{rid}/{i}", data) for i, data in enumerate(instances)])
        self.metrics.queued.labels(self.label).set(self.loop.queued())

        def done(future):
            if future.cancelled():
                self._drop(key)

        ticket.future.add_done_callback(done)
        return ticket.future

    def _drop(self, key: int) -> None:
        """A cancelled request: its rows not yet taken are not run."""
        n = self.loop.drop(key)
        if n:
            self.metrics.cancelled.labels(self.label).inc(n)
            self.metrics.queued.labels(self.label).set(self.loop.queued())

    def _run(self, rows: list[Row], worker: int) -> None:
        now = self.clock()
        m = self.metrics
        live = [r for r in rows if not r.item[0].future.cancelled()]  # cancelled since the batch was cut
        if len(live) < len(rows):
            m.cancelled.labels(self.label).inc(len(rows) - len(live))
            rows = live
        if not rows:
            return
        m.batch.labels(self.label).observe(len(rows))
        m.queued.labels(self.label).set(self.loop.queued())
        for r in rows:
            m.queue.labels(self.label).observe(now - r.enqueued)
        items = [r.item for r in rows]
        ids = [i[2] for i in items]
        batch = pa.record_batch([pa.array(ids, pa.string()), pa.array(ids, pa.string()),
                                 pa.array([i[3] for i in items], pa.binary())], schema=REQUEST_SCHEMA)
        try:
            answer = self.engines[worker].run(batch)
            rows_out, errors = answer.by_id("responses", self.fields), answer.errors()
        except Exception as exc:  # noqa: BLE001 - a failing batch answers its rows, the server goes on
            rows_out, errors = {}, {i: ("server", error_text(exc)) for i in ids}
        for ticket, index, rid, _ in items:
            if rid in rows_out:
                ticket.answer(index, rows_out[rid])
            else:
                stage, error = errors.get(rid, ("server", "the graph gave no answer for this instance"))
                m.dead.labels(self.label, stage).inc()
                ticket.answer(index, {"error": error, "stage": stage})

    def close(self, timeout: float | None = None) -> None:
        """Take no more; answer what was accepted; give back the sessions no other service uses."""
        self.loop.close(timeout)
        if not any(t.is_alive() for t in self.loop.threads):  # no batch runs any more
            self.engines = []
            self.ctx.release()

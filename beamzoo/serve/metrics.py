"""Prometheus metrics of one server (its own registry, so several servers can live in a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from beamzoo.core.context import Hooks

LATENCY_BUCKETS = (.002, .005, .01, .025, .05, .075, .1, .25, .5, .75, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        disable_created_metrics()  # no *_created series: they only add noise to a scrape
        r = self.registry = CollectorRegistry()
        self.requests = Counter("beamzoo_requests", "Requests answered, by model, protocol and outcome",
                                ["model", "version", "protocol", "outcome"], registry=r)
        self.latency = Histogram("beamzoo_request_seconds", "Time from a request's arrival to its answer",
                                 ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("beamzoo_queue_seconds", "Time a row waited in the queue for its batch",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("beamzoo_batch_rows", "Rows in each batch run through the graph",
                               ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.dead = Counter("beamzoo_dead_letters", "Rows dead-lettered, by model and the step that refused them",
                            ["model", "stage"], registry=r)
        self.queued = Gauge("beamzoo_queue_rows", "Rows waiting in the queue", ["model"], registry=r)
        self.cancelled = Counter("beamzoo_cancelled_rows", "Queued rows dropped unrun: their request timed out "
                                 "or its client went away", ["model"], registry=r)
        self.connections = Gauge("beamzoo_connections", "Open HTTP connections", registry=r)
        self.closed = Counter("beamzoo_connections_closed", "Connections the server closed for a limit: "
                              "header_timeout, body_timeout, over_capacity", ["reason"], registry=r)
        self.inflight = Gauge("beamzoo_inflight_bytes", "Bytes of request bodies being read or waiting for "
                              "their answers", registry=r)
        self.step_rows = Counter("beamzoo_step_rows", "Rows through each step of a served graph: in, out, dead "
                                 "(dead-lettered), skipped", ["model", "step", "what"], registry=r)
        self.step_batches = Counter("beamzoo_step_batches", "Batches through each step", ["model", "step"],
                                    registry=r)
        self.step_seconds = Counter("beamzoo_step_seconds", "Seconds in each step, of wall and of CPU time",
                                    ["model", "step", "clock"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class StepSeries(Hooks):
    """A run context's hook: every step's metrics as the server's Prometheus series."""

    def __init__(self, metrics: Metrics, model: str):
        self.m, self.model = metrics, model

    def batch_done(self, ctx, step, kind, s):
        m, model = self.m, self.model
        for what, n in (("in", s.rows_in), ("out", s.rows_out), ("dead", s.dead), ("skipped", s.skipped)):
            if n:
                m.step_rows.labels(model, step, what).inc(n)
        if s.batches:
            m.step_batches.labels(model, step).inc(s.batches)
            m.step_seconds.labels(model, step, "wall").inc(s.wall_s)
            m.step_seconds.labels(model, step, "cpu").inc(s.cpu_s)

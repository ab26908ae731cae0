"""Prometheus metrics of one server (its own registry, so several servers can live in a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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

    def text(self) -> bytes:
        return generate_latest(self.registry)

"""One inference request, whatever carried it (HTTP JSON, HTTP binary, gRPC): the model looked
up, its instances queued, their results made into an answer, the refusals named.

``submit`` looks the model up and queues the instances that could be read; a
version retired between the lookup and the queueing is looked up again (its
requests move to the version now served). ``results`` puts the unreadable
instances' errors back in order. ``refusal`` says what a request that cannot
be served gets: an HTTP status (which gRPC maps to its codes), the outcome
label of the requests counter, and one line.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from beamzoo.serve import protocol as P
from beamzoo.serve.batcher import Closed, QueueFull
from beamzoo.serve.limits import Busy
from beamzoo.serve.models import UnknownServable

# what went wrong in a whole request -> the outcome label of the requests counter
OUTCOME = {400: "bad_request", 404: "not_found", 405: "bad_request", 408: "slow_body", 413: "too_large",
           429: "queue_full", 503: "unavailable", 504: "timeout", 500: "error"}


@dataclass
class Pending:
    """A request's instances, queued: ``future`` gives one result per readable instance."""

    servable: object
    service: object
    items: list
    future: Future


def submit(server, name: str, version: str | None, items: list) -> Pending:
    """Queue ``items`` (bytes, or ``protocol.Unreadable``) for ``name[:version]``; raises
    ``UnknownServable``, ``protocol.BadRequest``, ``QueueFull`` or ``Closed``."""
    if len(items) > server.max_queue:
        raise P.BadRequest(f"the request has {len(items)} instances; this server takes at most "
                           f"{server.max_queue} in one request (--max_queue)", 413)
    good = [i for i in items if not isinstance(i, P.Unreadable)]
    for attempt in range(3):
        servable, service = server.lookup(name, version)
        try:
            return Pending(servable, service, items, service.submit(good))
        except Closed:
            if server.closed or attempt == 2:  # the server stops, not a version swapped out
                raise
    raise AssertionError("unreachable")


def results(pending: Pending, answers: list, metrics) -> list[dict]:
    """One result per instance, in order: the graph's answer, or why the instance was unreadable."""
    answers = iter(answers)
    out = [{"error": str(i), "stage": "request"} if isinstance(i, P.Unreadable) else next(answers)
           for i in pending.items]
    for r in out:
        if r.get("stage") == "request":
            metrics.dead.labels(pending.servable.name, "request").inc()
    return P.clean(out)


def failed(results: list[dict]) -> tuple[int, str] | None:
    """When no instance has an answer, the request failed: (status, one line); else None."""
    bad = [r for r in results if "error" in r]
    if not results or len(bad) < len(results):
        return None
    status = 500 if any(r["stage"] == "server" for r in bad) else 400
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return status, f"{bad[0]['stage']}: {bad[0]['error']}{more}"


def outcome(results: list[dict]) -> str:
    return "partial" if any("error" in r for r in results) else "ok"


def refusal(exc: BaseException) -> tuple[int, str, str] | None:
    """(status, outcome, message) for a request refused as a whole; None for anything else."""
    if isinstance(exc, UnknownServable):
        return 404, "not_found", str(exc)
    if isinstance(exc, P.BadRequest):
        return exc.status, OUTCOME.get(exc.status, "bad_request"), str(exc)
    if isinstance(exc, QueueFull):
        return 429, "queue_full", f"the server is busy: {exc}; retry later"
    if isinstance(exc, Busy):
        return 429, "busy", f"the server is busy: {exc}; retry later"
    if isinstance(exc, Closed):
        return 503, "unavailable", str(exc)
    return None


__all__ = ["OUTCOME", "Pending", "failed", "outcome", "refusal", "results", "submit"]

"""The server's knobs (its batching and limits), declared apart from the server itself so that
``beamzoo serve --help`` and the command line need no server packages to be read."""
from __future__ import annotations

from beamzoo.core.knobs import Knob

SERVER_KNOBS = {
    "max_batch": Knob(8, int, low=1, high=65536, results=False, doc="most rows run through the graph at once",
                      tune=(1, 2, 4, 8, 16, 32)),
    "max_delay_ms": Knob(5.0, float, low=0.0, results=False, tune=(0.0, 2.0, 5.0, 10.0, 20.0),
                         doc="longest a row waits for others to fill its batch, in milliseconds"),
    "max_queue": Knob(256, int, low=1, results=False, doc="rows waiting at most; beyond, requests get 429 at once"),
    "max_body_bytes": Knob(32 << 20, int, low=1, results=False, unit="bytes",
                           doc="largest request body; larger ones get 413"),
    "workers": Knob(None, int, low=1, high=4096, results=False, tune="cores",
                    doc="threads running batches (default: the CPU count)"),
    "timeout_s": Knob(60.0, float, low=0.001, results=False, unit="seconds",
                      doc="a request not answered this long after it came gets 504, and its rows not yet run "
                          "are dropped from the queue"),
    "header_timeout_s": Knob(10.0, float, low=0.001, results=False, unit="seconds",
                             doc="a connection that has not sent a whole request head this long after it opened "
                                 "(or after a next request's first byte) gets 408 and is closed"),
    "body_timeout_s": Knob(30.0, float, low=0.001, results=False, unit="seconds",
                           doc="a request whose body has not all come this long after its head gets 408 and its "
                               "connection is closed"),
    "max_connections": Knob(1024, int, low=1, results=False,
                            doc="open connections at most; requests on any more get 503 with Retry-After"),
    "adapt": Knob(False, bool, results=False,
                  doc="keep each step of the served graph within its latency budget (a --config's budgets) as "
                      "requests come: the batch size and delay move within bounds, each change logged and counted"),
    "max_inflight_bytes": Knob(256 << 20, int, low=1, results=False, unit="bytes",
                               doc="bytes of request bodies being read or waiting for their answers at most, "
                                   "across requests (at least --max_body_bytes); past it, requests get 429 with "
                                   "Retry-After"),
}

__all__ = ["SERVER_KNOBS"]

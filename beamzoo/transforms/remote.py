"""A graph step that classifies its rows on remote beamzoo servers, with failover.

``RemoteClassify(endpoints=[...], model=...)`` sends each row's image (the
bytes in ``data``, or the file at ``path`` read when it is sent, so no bytes
travel through the graph) to one of the endpoints over TF Serving REST, in
requests of ``max_batch`` rows, and adds the answer as ``prefix``-named
columns plus ``<prefix>endpoint`` (who answered). Nothing else of the row
leaves the device. An endpoint that does not answer (refused, reset, timed
out, 5xx, 429, 404) is marked down for ``cooldown_s`` in this process and
the request goes to the next one; a row is answered once, by the endpoint
whose answer came back. With none left, the rows dead-letter naming each
endpoint's failure. The run's counters say how many rows each endpoint
answered (``RunStats.counters["<step> answered by <url>"]``, Beam counters too).
Standard library only: a device graph with a remote step needs no server packages.
"""
from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections import Counter

import pyarrow as pa

from beamzoo.core.knobs import Knob, pick
from beamzoo.core.op import Operator, Result, dead_letters
from beamzoo.core.schemas import PATH
from beamzoo.transforms.io import ReadFiles, read_bytes
from beamzoo.transforms.postprocess import PREDICTION_FIELDS


class _Pool:
    """The endpoints' health in this process, shared by every thread of the step."""

    def __init__(self, endpoints: list[str], cooldown: float):
        self.endpoints, self.cooldown = list(endpoints), cooldown
        self.down_until = {e: 0.0 for e in endpoints}
        self.next = 0
        self.lock = threading.Lock()

    def order(self) -> list[str]:
        """Endpoints to try, healthy ones first (round robin), then those marked down."""
        with self.lock:
            now = time.monotonic()
            start, self.next = self.next, self.next + 1
        ring = self.endpoints[start % len(self.endpoints):] + self.endpoints[:start % len(self.endpoints)]
        return [e for e in ring if self.down_until[e] <= now] + [e for e in ring if self.down_until[e] > now]

    def down(self, endpoint: str) -> None:
        with self.lock:
            self.down_until[endpoint] = time.monotonic() + self.cooldown


class EndpointFailed(Exception):
    """The endpoint did not answer; another may."""


class Refused(Exception):
    """The endpoint answered that the request cannot be served; another would say the same."""


class RemoteClassify(Operator):
    """path (or data) -> the answer of a remote beamzoo server: ``<prefix>label``, ``<prefix>score``,
    ... and ``<prefix>endpoint``."""

    name = "remote_classify"
    default_id = "remote"
    knobs = {
        "endpoints": Knob(None, list, required=True, doc="base URLs of beamzoo servers, tried in turn"),
        "model": Knob(None, str, required=True, doc="the remote model, name or name:version"),
        "input": Knob("path", str, choices=("path", "data"),
                      doc="send the file at 'path' (read when sent) or the bytes in 'data'"),
        "prefix": Knob("remote_", str, doc="prefix of the answer's columns"),
        "max_batch": Knob(8, int, low=1, high=4096, results=False, doc="rows per request"),
        "timeout_s": Knob(30.0, float, low=0.001, results=False, unit="seconds", doc="a request's time limit"),
        "cooldown_s": Knob(5.0, float, low=0.0, results=False, unit="seconds",
                           doc="how long a failed endpoint is skipped"),
        **pick(ReadFiles, "max_bytes"),
    }
    positional = ("endpoints",)

    def configure(self):
        p = self.params
        if not p["endpoints"] or not all(isinstance(e, str) and e.startswith(("http://", "https://"))
                                         for e in p["endpoints"]):
            raise ValueError(f"RemoteClassify: endpoints must be http(s) URLs, got {p['endpoints']!r}")
        name, _, version = p["model"].partition(":")
        self.path = f"/v1/models/{name}" + (f"/versions/{version}" if version else "") + ":predict"
        self.requires = pa.schema([PATH if p["input"] == "path" else pa.field("data", pa.binary())])
        fields = [f.with_name(p["prefix"] + f.name) for f in PREDICTION_FIELDS]
        self.produces = pa.schema(fields + [pa.field(p["prefix"] + "endpoint", pa.string())])
        self._conns: dict[str, http.client.HTTPConnection] = {}

    def __getstate__(self):  # connections and the pool are made again where the step runs
        return {k: v for k, v in {**super().__getstate__(), "_conns": {}}.items() if k != "pool"}

    def setup(self):
        p = self.params
        self.pool = self.ctx.shared(("remote_classify", tuple(p["endpoints"]), p["cooldown_s"]),
                                    lambda: _Pool(p["endpoints"], p["cooldown_s"]))

    # ------------------------------------------------------------------ one request
    def _post(self, endpoint: str, body: bytes) -> list[dict]:
        from urllib.parse import urlsplit
        conn = self._conns.get(endpoint)
        if conn is None:
            u = urlsplit(endpoint)
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = self._conns[endpoint] = cls(u.hostname, u.port, timeout=self.params["timeout_s"])
        try:
            conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            text = r.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._conns.pop(endpoint, None)
            raise EndpointFailed(f"{type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {"error": text[:200].decode("utf-8", "replace")}
        if r.status in (404, 429) or r.status >= 500:
            raise EndpointFailed(f"HTTP {r.status}: {answer.get('error', '')}")
        if "predictions" in answer:  # 200, or 400 when every row failed: each row says why
            return answer["predictions"]
        raise Refused(f"HTTP {r.status}: {answer.get('error', '')}")

    def _send(self, body: bytes) -> tuple[str, list[dict]]:
        failures = []
        for endpoint in self.pool.order():
            try:
                return endpoint, self._post(endpoint, body)
            except EndpointFailed as exc:
                self.pool.down(endpoint)
                failures.append(f"{endpoint}: {exc}")
        raise EndpointFailed("no endpoint answered (" + "; ".join(failures) + ")")

    # ------------------------------------------------------------------ the step
    def process(self, batch: pa.RecordBatch) -> Result:
        self.bind()
        p = self.params
        values = batch.column(p["input"]).to_pylist()
        answers: dict[int, dict] = {}
        bad: dict[int, str] = {}
        images: list[tuple[int, str]] = []
        for i, v in enumerate(values):
            try:
                data = read_bytes(v, p["max_bytes"]) if p["input"] == "path" else v
                if not data or len(data) > p["max_bytes"]:
                    raise ValueError("empty file (0 bytes)" if not data else
                                     f"file is over the limit of {p['max_bytes']} bytes")
                images.append((i, base64.b64encode(data).decode()))
            except (OSError, ValueError) as exc:
                bad[i] = f"{type(exc).__name__}: {exc}"
        counts = Counter()
        for start in range(0, len(images), p["max_batch"]):
            chunk = images[start:start + p["max_batch"]]
            body = json.dumps({"instances": [{"b64": b} for _, b in chunk]}).encode()
            try:
                endpoint, preds = self._send(body)
            except (EndpointFailed, Refused) as exc:
                for i, _ in chunk:
                    bad[i] = str(exc)
                continue
            if len(preds) != len(chunk):
                for i, _ in chunk:
                    bad[i] = f"{endpoint} answered {len(preds)} predictions for {len(chunk)} rows"
                continue
            for (i, _), pred in zip(chunk, preds):
                if "error" in pred:
                    bad[i] = f"{endpoint}: {pred.get('stage', 'remote')}: {pred['error']}"
                else:
                    answers[i] = {**pred, "endpoint": endpoint}
                    counts[endpoint] += 1
        for endpoint, n in counts.items():
            self.ctx.count(f"{self.id} answered by {endpoint}", n)
        keep = sorted(answers)
        kept = batch.take(pa.array(keep, pa.int64()))
        schema = self.output_schemas([batch.schema])["out"]
        produced = {p["prefix"] + f.name: pa.array([answers[i][f.name] for i in keep], f.type)
                    for f in [*PREDICTION_FIELDS, pa.field("endpoint", pa.string())]}
        out = pa.record_batch([produced[f.name] if f.name in produced else kept.column(f.name) for f in schema],
                              schema=schema)
        rows = sorted(bad)
        return Result(out, dead_letters(batch, rows, self.id, [bad[i] for i in rows]))

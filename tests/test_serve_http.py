"""beamzoo serve over real sockets on 127.0.0.1: the same rows as the batch pipeline, both
protocols, metrics, dynamic batching, a bounded queue, bad requests."""
from __future__ import annotations

import base64
import http.client
import itertools
import json
import re
import select
import socket
import threading
import time

import pytest

from beamzoo.samples import sample_files
from beamzoo.serve.models import Servable
from beamzoo.serve.server import Server
from beamzoo.serve.client import Client, ServerError
from tests.badfiles import png_bomb
from conftest import tiny_card, tiny_colour_model, write_colour_image

FIELDS = ("label", "score", "topk_labels", "topk_scores", "model")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def close_to(a, b, tol=1e-5):
    if isinstance(a, float):
        return abs(a - b) <= tol
    if isinstance(a, list):
        return len(a) == len(b) and all(close_to(x, y, tol) for x, y in zip(a, b))
    return a == b


@pytest.mark.integration
def test_tf_predictions_are_the_batch_pipeline_rows(lite0, batch_rows):
    files = sample_files()
    with Client(lite0.url) as c:
        preds = c.predict("efficientnet_lite0", files)
    assert len(preds) == len(files) == len(batch_rows)
    for f, p in zip(files, preds):
        row = batch_rows[f.name]
        assert set(p) == set(FIELDS), p
        for k in FIELDS:
            assert close_to(p[k], row[k]), (f.name, k, p[k], row[k])


@pytest.mark.integration
def test_v2_outputs_are_the_batch_pipeline_columns(lite0, batch_rows):
    files = sample_files()[:5]
    with Client(lite0.url) as c:
        answer = c.infer("efficientnet_lite0", files, id="req-7")
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("efficientnet_lite0", "1", "req-7")
    outs = {o["name"]: o for o in answer["outputs"]}
    assert list(outs) == list(FIELDS)
    assert outs["score"]["datatype"] == "FP32" and outs["label"]["datatype"] == "BYTES"
    k = outs["topk_scores"]["shape"][1]
    assert outs["topk_scores"]["shape"] == [5, k] and k == 5
    for i, f in enumerate(files):
        row = batch_rows[f.name]
        assert outs["label"]["data"][i] == row["label"]
        assert close_to(outs["score"]["data"][i], row["score"])
        assert close_to(outs["topk_scores"]["data"][i * k:(i + 1) * k], row["topk_scores"])
        assert outs["topk_labels"]["data"][i * k:(i + 1) * k] == row["topk_labels"]


@pytest.mark.integration
def test_tf_columnar_inputs_and_image_instances(lite0, batch_rows):
    f = sample_files()[0]
    data = b64(f.read_bytes())
    with Client(lite0.url) as c:
        status, cols = c.request("POST", "/v1/models/efficientnet_lite0:predict",
                                 {"inputs": {"image": [{"b64": data}, {"b64": data}]}})
        assert status == 200
        assert cols["outputs"]["label"] == [batch_rows[f.name]["label"]] * 2
        status, rows = c.request("POST", "/v1/models/efficientnet_lite0/versions/1:predict",
                                 {"instances": [{"image": {"b64": data}}]})
        assert status == 200 and rows["predictions"][0]["label"] == batch_rows[f.name]["label"]


@pytest.mark.integration
def test_status_metadata_and_health(lite0):
    with Client(lite0.url) as c:
        assert c.request("GET", "/v1/models/efficientnet_lite0") == (200, {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
        meta = c.metadata("efficientnet_lite0", "1")
        assert meta["model_spec"] == {"name": "efficientnet_lite0", "signature_name": "", "version": "1"}
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert list(sig["inputs"]) == ["image"] and list(sig["outputs"]) == list(FIELDS)
        model = meta["metadata"]["model"]
        assert model["inputs"] == [{"name": "images", "dtype": "float32", "shape": [-1, 3, 224, 224]}]
        assert model["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [-1, 1000]}]
        assert model["labels"] == 1000
        assert c.request("GET", "/v2/health/live")[0] == 200
        assert c.request("GET", "/v2/health/ready") == (200, {"ready": True})
        assert c.request("GET", "/v2/models/efficientnet_lite0/ready") == \
            (200, {"name": "efficientnet_lite0", "ready": True})
        status, v2 = c.request("GET", "/v2/models/efficientnet_lite0")
        assert status == 200 and v2["versions"] == ["1"]
        assert v2["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert [o["name"] for o in v2["outputs"]] == list(FIELDS)


def test_versions_default_to_the_newest_and_unknown_ones_are_404(tiny):
    with Client(tiny.url) as c:
        status, body = c.request("GET", "/v1/models/tiny_colour")
        assert status == 200 and [v["version"] for v in body["model_version_status"]] == ["1", "2"]
        assert c.predict("tiny_colour", [tiny.images["red"]])[0]["model"] == "tiny_colour:2"
        assert c.predict("tiny_colour", [tiny.images["red"]], version="1")[0]["model"] == "tiny_colour:1"
        for method, path in (("POST", "/v1/models/tiny_colour/versions/9:predict"),
                             ("POST", "/v1/models/nope:predict"), ("GET", "/v1/models/nope/metadata"),
                             ("POST", "/v2/models/nope/infer"), ("GET", "/v2/models/tiny_colour/versions/9/ready")):
            status, body = c.request(method, path, {"instances": [{"b64": b64(tiny.images["red"])}]})
            assert status == 404 and ("no model named 'nope'" in body["error"] or "no version '9'" in body["error"])
        status, body = c.request("GET", "/v1/nothing")
        assert status == 404 and "error" in body
        status, body = c.request("GET", "/v1/models/tiny_colour:predict")
        assert status == 405 and "POST" in body["error"]


def test_one_bad_instance_does_not_fail_the_others(tiny):
    bomb = png_bomb(20000, 20000)
    with Client(tiny.url) as c:
        status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [
            {"b64": b64(tiny.images["red"])}, {"b64": b64(b"this is text, not an image")}, {"b64": "%%%"},
            {"b64": b64(bomb)}, {"b64": b64(tiny.images["blue"])}]})
    assert status == 200
    p = body["predictions"]
    assert p[0]["label"] == "red" and p[4]["label"] == "blue"
    assert p[1]["stage"] == "classify/decode" and "not an image" in p[1]["error"]
    assert p[2]["stage"] == "request" and "not valid base64" in p[2]["error"]
    assert p[3]["stage"] == "classify/decode" and "20000x20000" in p[3]["error"] and "over the limit" in p[3]["error"]


@pytest.mark.parametrize("raw, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"instances": "x"}', 400, "non-empty list"),
    (b'{"signature_name": "a"}', 400, 'needs "instances"'),
    (b'{"instances": [{"b64": "@@"}]}', 400, "not valid base64"),
    (b'{"instances": [{"pixels": [1, 2]}]}', 400, 'expected {"b64"'),
    (json.dumps({"instances": [{"b64": b64(b"GIF89a\x10\x00\x10\x00 not really")}]}).encode(), 400, "classify/decode"),
    (json.dumps({"instances": [{"b64": b64(png_bomb(30000, 30000))}]}).encode(), 400, "over the limit"),
    (b"[" * 50_000, 400, "JSON"),
    (b'{"instances": [' + b",".join([b'{"b64": "QQ=="}'] * 9) + b"]}", 413, "at most 8 in one request"),
    (b" " * (65 << 10), 413, "over the limit of 65536 bytes"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(tiny, raw, status, message):
    with Client(tiny.url) as c:
        got, body = c.request("POST", "/v1/models/tiny_colour:predict", raw=raw)
        assert got == status and message in body["error"], body
        assert c.predict("tiny_colour", [tiny.images["green"]])[0]["label"] == "green"  # still serving


def test_v2_bad_requests_and_a_partly_bad_batch(tiny):
    with Client(tiny.url) as c:
        status, body = c.request("POST", "/v2/models/tiny_colour/infer", {"inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
        assert status == 400 and 'datatype "BYTES"' in body["error"]
        status, body = c.request("POST", "/v2/models/tiny_colour/infer", {"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(tiny.images["red"]), "!!"]}],
            "outputs": [{"name": "label"}]})
        assert status == 200
        assert body["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [2], "data": ["red", None]},
                                   {"name": "error", "datatype": "BYTES", "shape": [2],
                                    "data": [None, body["outputs"][1]["data"][1]]}]
        assert "not valid base64" in body["outputs"][1]["data"][1]


def test_a_body_without_content_length_is_cut_at_the_limit(tiny):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", int(tiny.url.rsplit(":", 1)[1]), timeout=30)
    chunks = (b" " * 8192 for _ in range(16))  # 128 KiB, chunked: the server cannot know the size up front
    conn.request("POST", "/v1/models/tiny_colour:predict", body=chunks, encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]
    conn.close()


def test_metrics_count_requests_batches_queue_time_and_dead_letters(tiny):
    with Client(tiny.url) as c:
        before = c.request("GET", "/metrics")[1]
        c.predict("tiny_colour", [tiny.images["red"], b"junk", tiny.images["blue"]])
        c.request("POST", "/v1/models/tiny_colour:predict", raw=b"{")
        status, text = c.request("GET", "/metrics")
    assert status == 200

    def grew(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert grew("beamzoo_requests_total", model="tiny_colour", protocol="tf", outcome="partial") == 1
    assert grew("beamzoo_requests_total", model="tiny_colour", outcome="bad_request") == 1
    assert grew("beamzoo_request_seconds_count", model="tiny_colour", protocol="tf") == 2
    assert grew("beamzoo_dead_letters_total", model="tiny_colour", stage="classify/decode") == 1
    assert grew("beamzoo_batch_rows_sum", model="tiny_colour") == 3
    assert grew("beamzoo_queue_seconds_count", model="tiny_colour") == 3
    assert "# TYPE beamzoo_request_seconds histogram" in text
    # every step of the served graph, as Prometheus series: rows in = out + dead, its batches, its seconds
    step = "classify/decode+resize"
    assert grew("beamzoo_step_rows_total", model="tiny_colour", step=step, what="in") == 3
    assert grew("beamzoo_step_rows_total", model="tiny_colour", step=step, what="out") == 2
    assert grew("beamzoo_step_rows_total", model="tiny_colour", step=step, what="dead") == 1
    assert grew("beamzoo_step_rows_total", model="tiny_colour", step="classify/infer", what="in") == 2
    assert grew("beamzoo_step_batches_total", model="tiny_colour", step="classify/infer") >= 1
    assert grew("beamzoo_step_seconds_total", model="tiny_colour", step="classify/infer", clock="cpu") > 0


def test_rows_of_concurrent_requests_share_batches(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()
    running = Server([Servable.from_model(card)], max_batch=8, max_delay_ms=300, workers=1).start()
    try:
        results = []

        def one():
            with Client(running.url) as c:
                results.append(c.predict("tiny_colour", [red])[0]["label"])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        text = Client(running.url).request("GET", "/metrics")[1]
    finally:
        running.stop()
    assert results == ["red"] * 8
    batches = metric(text, "beamzoo_batch_rows_count")
    assert metric(text, "beamzoo_batch_rows_sum") == 8 and batches < 8, f"8 requests ran in {batches} batches"


def test_a_full_queue_answers_429_at_once(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()
    running = Server([Servable.from_model(card)], max_batch=64, max_delay_ms=3000, max_queue=4, workers=1).start()
    try:
        first = {}

        def fill():  # four rows: the queue is full until their batch is due, 3 s later
            with Client(running.url) as c:
                first["predictions"] = c.predict("tiny_colour", [red] * 4)
                first["done"] = time.monotonic()

        t = threading.Thread(target=fill)
        t.start()
        with Client(running.url) as c:
            deadline = time.monotonic() + 10
            while metric(c.request("GET", "/metrics")[1], "beamzoo_queue_rows") < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [{"b64": b64(red)}]})
            refused = time.monotonic()
            assert "done" not in first, "the first request was answered before the queue was tried"
            assert status == 429 and "busy" in body["error"]
        t.join(30)
        assert [p["label"] for p in first["predictions"]] == ["red"] * 4 and refused < first["done"]
    finally:
        running.stop()


def test_client_raises_server_errors(tiny):
    with Client(tiny.url) as c, pytest.raises(ServerError, match="HTTP 404: no model named 'nope'"):
        c.predict("nope", [tiny.images["red"]])


def test_max_pixels_refuses_an_image_from_its_header(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()  # 48x40
    running = Server([Servable.from_model(card, max_pixels=1000)], workers=1).start()
    try:
        with Client(running.url) as c:
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [{"b64": b64(red)}]})
    finally:
        running.stop()
    assert status == 400 and "48x40 = 1920 pixels, over the limit of 1000" in body["error"], body


def test_a_request_not_answered_in_time_gets_504_and_the_server_goes_on(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()
    running = Server([Servable.from_model(card)], max_delay_ms=1500, timeout_s=0.3, workers=1).start()
    try:
        with Client(running.url) as c:
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [{"b64": b64(red)}]})
            assert status == 504 and "no answer within 0.3 s" in body["error"]
            time.sleep(1.5)  # its row was dropped unrun: nothing may break
            running.server.timeout_s = 30
            assert c.predict("tiny_colour", [red])[0]["label"] == "red"
            assert metric(c.request("GET", "/metrics")[1], "beamzoo_requests_total", outcome="timeout") == 1
    finally:
        running.stop()


# ---------------------------------------------------------------- slow and greedy clients


def guarded_server(tmp_path, **knobs) -> tuple:
    """The tiny model served with ``knobs``; (running server, a red PNG's bytes)."""
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()
    return Server([Servable.from_model(card)], workers=1, **knobs).start(), red


def address(running) -> tuple[str, int]:
    return "127.0.0.1", int(running.url.rsplit(":", 1)[1])


def trickle(sock: socket.socket, data: bytes, every: float = 0.1, within: float = 10.0) -> tuple[bool, bytes]:
    """Send ``data`` a byte at a time; (whether the server closed the connection within
    ``within`` seconds, what it sent back)."""
    got, deadline = b"", time.monotonic() + within
    for i in itertools.cycle(range(len(data))):
        if time.monotonic() > deadline:
            return False, got
        try:
            sock.sendall(data[i:i + 1])
            readable, _, _ = select.select([sock], [], [], every)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    return True, got
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True, got


def read_until_closed(sock: socket.socket, within: float = 10.0) -> tuple[bool, bytes]:
    got, deadline = b"", time.monotonic() + within
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def wait_for_metric(running, name: str, value: float, within: float = 10.0, **labels) -> float:
    """The server's own metric (no connection made), once it reads ``value`` or ``within`` passed."""
    deadline = time.monotonic() + within
    while True:
        v = metric(running.server.metrics.text().decode(), name, **labels)
        if v == value or time.monotonic() > deadline:
            return v
        time.sleep(0.02)


PREDICT = b"POST /v1/models/tiny_colour:predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


def test_a_client_trickling_its_request_head_is_disconnected(tmp_path):
    running, _ = guarded_server(tmp_path, header_timeout_s=0.5)
    try:
        with socket.create_connection(address(running), timeout=10) as s:
            closed, got = trickle(s, PREDICT + b"X-Slow: " + b"a" * 1000)
        assert closed and got.startswith(b"HTTP/1.1 408"), got
        with socket.create_connection(address(running), timeout=10) as s:  # one that sends nothing at all
            closed, got = read_until_closed(s)
        assert closed and got.startswith(b"HTTP/1.1 408"), got
        assert wait_for_metric(running, "beamzoo_connections_closed_total", 2, reason="header_timeout") == 2
        with Client(running.url) as c:  # the next client is served as ever
            assert c.request("GET", "/v2/health/live")[0] == 200
    finally:
        running.stop()


def test_a_client_trickling_its_body_gets_408_and_is_disconnected(tmp_path):
    running, _ = guarded_server(tmp_path, body_timeout_s=0.5)
    try:
        with socket.create_connection(address(running), timeout=10) as s:
            s.sendall(PREDICT + b"Content-Length: 100000\r\n\r\n")
            closed, got = trickle(s, b'{"instances": [' + b" " * 1000)
        assert closed and (got == b"" or got.startswith(b"HTTP/1.1 408")), got
        assert wait_for_metric(running, "beamzoo_requests_total", 1, outcome="slow_body") == 1
    finally:
        running.stop()


def test_a_body_answered_before_it_came_must_still_come_in_time(tmp_path):
    running, _ = guarded_server(tmp_path, body_timeout_s=0.5, max_body_bytes=1000)
    try:
        with socket.create_connection(address(running), timeout=10) as s:
            s.sendall(PREDICT + b"Content-Length: 5000\r\n\r\n{")  # over the limit: 413 at once
            closed, got = trickle(s, b" " * 1000)
        assert got.startswith(b"HTTP/1.1 413") and closed, got
        assert wait_for_metric(running, "beamzoo_connections_closed_total", 1, reason="body_timeout") == 1
    finally:
        running.stop()


def test_connections_past_the_cap_get_503_with_retry_after(tmp_path):
    running, red = guarded_server(tmp_path, max_connections=2, header_timeout_s=60)
    idle = [socket.create_connection(address(running), timeout=10) for _ in range(2)]
    try:
        assert wait_for_metric(running, "beamzoo_connections", 2) == 2
        conn = http.client.HTTPConnection(*address(running), timeout=10)
        conn.request("GET", "/v2/health/live")
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 503 and r.getheader("Retry-After") == "1", (r.status, r.headers)
        assert "--max_connections" in body["error"]
        conn.close()
        idle.pop().close()
        assert wait_for_metric(running, "beamzoo_connections", 1) == 1
        with Client(running.url) as c:  # under the cap again: served
            assert c.predict("tiny_colour", [red])[0]["label"] == "red"
        assert metric(running.server.metrics.text().decode(), "beamzoo_connections_closed_total",
                      reason="over_capacity") == 1
    finally:
        for s in idle:
            s.close()
        running.stop()


def test_bodies_in_flight_past_the_cap_get_429_with_retry_after(tmp_path):
    running, red = guarded_server(tmp_path, max_body_bytes=60_000, max_inflight_bytes=100_000)
    held = socket.create_connection(address(running), timeout=10)
    try:
        held.sendall(PREDICT + b"Content-Length: 60000\r\n\r\n{")  # a body on its way: 60000 bytes held
        assert wait_for_metric(running, "beamzoo_inflight_bytes", 60_000) == 60_000
        with Client(running.url) as c:
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", raw=b" " * 50_000)
            assert status == 429 and "--max_inflight_bytes" in body["error"], body
            conn = http.client.HTTPConnection(*address(running), timeout=10)  # chunked: refused as it comes
            conn.request("POST", "/v1/models/tiny_colour:predict", body=(b" " * 10_000 for _ in range(5)),
                         encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
            r = conn.getresponse()
            assert r.status == 429 and r.getheader("Retry-After") == "1", r.status
            conn.close()
            assert c.predict("tiny_colour", [red])[0]["label"] == "red"  # a small one fits
            held.close()
            assert wait_for_metric(running, "beamzoo_inflight_bytes", 0) == 0  # given back
            assert c.predict("tiny_colour", [red])[0]["label"] == "red"
        assert metric(running.server.metrics.text().decode(), "beamzoo_requests_total", outcome="busy") == 2
    finally:
        held.close()
        running.stop()


def test_the_rows_of_a_request_that_timed_out_are_not_run(tmp_path):
    # the row waits for a batch due in 60 s; the request's budget is 0.3 s
    running, red = guarded_server(tmp_path, max_batch=8, max_delay_ms=60_000, timeout_s=0.3)
    try:
        with Client(running.url) as c:
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [{"b64": b64(red)}]})
        assert status == 504 and "no answer within 0.3 s" in body["error"]
        text = running.server.metrics.text().decode()
        assert metric(text, "beamzoo_queue_rows") == 0 and metric(text, "beamzoo_cancelled_rows_total") == 1
    finally:
        running.stop()  # runs whatever is still queued
    text = running.server.metrics.text().decode()
    assert metric(text, "beamzoo_batch_rows_count") == 0
    assert metric(text, "beamzoo_step_rows_total", step="classify/decode+resize", what="in") == 0


def test_the_rows_of_a_request_whose_client_went_away_are_not_run(tmp_path):
    running, red = guarded_server(tmp_path, max_batch=8, max_delay_ms=60_000)
    try:
        body = json.dumps({"instances": [{"b64": b64(red)}] * 3}).encode()
        with socket.create_connection(address(running), timeout=10) as s:
            s.sendall(PREDICT + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert wait_for_metric(running, "beamzoo_queue_rows", 3) == 3
        assert wait_for_metric(running, "beamzoo_cancelled_rows_total", 3) == 3
        assert metric(running.server.metrics.text().decode(), "beamzoo_queue_rows") == 0
    finally:
        running.stop()
    assert metric(running.server.metrics.text().decode(), "beamzoo_batch_rows_count") == 0

"""A remote tier: an edge-runner cascade escalates its unsure rows to beamzoo servers, with failover."""
from __future__ import annotations

import base64
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from beamzoo.bundle import export
from beamzoo.pipeline import Classify, Pipeline, score_images
from beamzoo.serve.client import Client
from beamzoo import RemoteClassify, TooManyDeadLetters
from beamzoo.transforms.flow import Merge, Route
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files
from conftest import run_graph, tiny_card, tiny_colour_model, write_colour_image
from tests.test_serve_cli import start
from tests.test_serve_http import metric
from tests.test_serve_redis import free_port

PURE = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
MUTED = {"red": (150, 110, 100), "green": (100, 150, 110), "blue": (100, 110, 150)}  # scores ~0.94


@pytest.fixture
def scene(tmp_path):
    """Photos the tiny model is sure of (pure colours) and unsure of (muted), and its card."""
    d = tmp_path / "images"
    d.mkdir()
    truth = {}
    for i in range(36):
        colour = list(PURE)[i % 3]
        rgb = (MUTED if i % 4 else PURE)[colour]  # 27 muted, 9 pure
        truth[write_colour_image(d / f"{i:03d}-{colour}.png", rgb)] = colour
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    return d, truth, card


def cascade(images, card, endpoints, out, **remote):
    p = Pipeline()
    preds = p | Files(str(images)) | Classify(card, topk=3)
    branches = preds | Route(escalate="score < 0.99", otherwise="keep")
    cloud = branches.escalate | RemoteClassify(endpoints, model="tiny_colour", prefix="cloud_", **remote)
    (cloud, branches.keep) | Merge() | WriteParquet(str(out / "predictions"))
    p.dead_letters | WriteParquet(str(out / "dead_letter"), id="write_dead_letters")
    return p.graph


@pytest.fixture
def tier(scene, tmp_path):
    """Two beamzoo servers of the tiny model's bundle, each answering a request after 150 ms."""
    _, _, card = scene
    bundle = export(score_images(str(tmp_path / "x" / "*.png"), str(tmp_path / "x-out"), card, topk=3),
                    tmp_path / "bundle")
    procs = [start("--bundle", bundle, "--workers", "1", "--max_batch", "2", "--max_delay_ms", "150")
             for _ in range(2)]
    yield procs
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def rows(folder):
    return pq.read_table(str(folder)).to_pylist()


def test_killing_one_endpoint_mid_run_loses_nothing(scene, tier, tmp_path):
    images, truth, card = scene
    (a, url_a), (b, url_b) = tier
    out = tmp_path / "out"
    graph = cascade(images, card, [url_a, url_b], out, max_batch=2, cooldown_s=60)
    result = {}
    run = threading.Thread(target=lambda: result.update(stats=run_graph(graph)))
    run.start()
    with Client(url_a) as c:  # kill A once it has answered two requests
        deadline = time.monotonic() + 60
        while metric(c.request("GET", "/metrics")[1], "beamzoo_requests_total", outcome="ok") < 2:
            assert time.monotonic() < deadline and run.is_alive(), "endpoint A answered nothing"
            time.sleep(0.01)
    a.send_signal(signal.SIGKILL)
    run.join(120)
    stats = result["stats"]
    assert stats.failed == 0 and stats.inputs == len(truth)
    got = rows(out / "predictions")
    assert sorted(r["path"] for r in got) == sorted(truth), "every row exactly once"
    escalated = [r for r in got if r["score"] < 0.99]
    assert len(escalated) == 27
    for r in got:
        if r in escalated:
            assert r["cloud_label"] == truth[r["path"]] and r["cloud_model"] == "tiny_colour:1"
            assert r["cloud_endpoint"] in (url_a, url_b)
        else:
            assert r["cloud_label"] is None and r["label"] == truth[r["path"]]
    by_endpoint = {e: sum(r["cloud_endpoint"] == e for r in escalated) for e in (url_a, url_b)}
    assert by_endpoint[url_a] >= 2 and by_endpoint[url_b] > 0, by_endpoint  # A (two requests, then killed) and B
    assert stats.counters == {f"remote answered by {e}": n for e, n in by_endpoint.items()}  # the run reports it


def test_with_no_endpoint_left_the_rows_dead_letter_and_the_run_ends(scene, tmp_path, runner):
    images, truth, card = scene
    dead_a, dead_b = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    with pytest.raises(TooManyDeadLetters, match="step 'remote' dead-lettered 27 of its 27 rows .*no endpoint "
                                                 "answered") as failed:  # the dead-letter limit: a run that fails
        run_graph(cascade(images, card, [dead_a, dead_b], out, timeout_s=5.0), runner)
    stats = failed.value.stats
    assert stats.inputs == len(truth) and stats.failed == 27 and stats.scored == 9
    assert len(rows(out / "predictions")) == 9  # what was done is committed
    dead = rows(out / "dead_letter")
    assert len(dead) == 27 and {d["stage"] for d in dead} == {"remote"}
    for d in dead:
        assert "no endpoint answered" in d["error"] and dead_a in d["error"] and dead_b in d["error"], d["error"]


class _Recorder(BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append((self.path, body))
        answer = json.dumps({"predictions": [{"label": "red", "score": 0.5, "topk_labels": ["red"],
                                              "topk_scores": [0.5], "model": "m:1"}] * len(body["instances"])})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args):
        pass


def test_only_the_image_leaves_the_device(scene, tmp_path):
    images, truth, card = scene
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stats = run_graph(cascade(images, card, [url], tmp_path / "out", max_batch=4))
    finally:
        server.shutdown()
    assert stats.failed == 0
    sent = [inst for path, body in _Recorder.bodies for inst in body["instances"]]
    assert all(path == "/v1/models/tiny_colour:predict" for path, _ in _Recorder.bodies)
    assert all(set(body) == {"instances"} for _, body in _Recorder.bodies)
    assert all(set(i) == {"b64"} for i in sent), "nothing but the image is sent"
    muted = sorted(open(p, "rb").read() for p in truth if int(p.rsplit("/", 1)[1][:3]) % 4)
    assert sorted(base64.b64decode(i["b64"]) for i in sent) == muted


def test_remote_step_refuses_bad_endpoints():
    with pytest.raises(ValueError, match="endpoints must be http"):
        RemoteClassify(["localhost:8501"], model="m")

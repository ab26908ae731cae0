"""``beamzoo serve`` as a user runs it: a process, its options, SIGTERM."""
from __future__ import annotations

import base64
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from beamzoo.bundle import export
from beamzoo.pipeline import score_images
from beamzoo.samples import sample_files
from beamzoo.serve.client import Client
from conftest import error_line
from tests.test_serve_http import metric

ROOT = Path(__file__).resolve().parents[1]


def beamzoo(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "beamzoo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def start(*args) -> tuple[subprocess.Popen, str]:
    """``beamzoo serve ARGS --port 0``; returns the process and its URL once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "beamzoo.cli", "serve", *map(str, args), "--port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"listening on (http://\S+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"no listening line: {line!r} {proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, m.group(1)


@pytest.mark.parametrize("argv, message", [
    (["serve"], "nothing to serve"),
    (["serve", "--model", "no_such_model"], "no model named 'no_such_model'"),
    (["serve", "--model", "efficientnet_lite0:7"], "has no version '7'"),
    (["serve", "--bundle", "/nonexistent/bundle"], "has no bundle.lock"),
    (["serve", "--zoo", "/nonexistent/repo"], "--zoo /nonexistent/repo: no such folder"),
    (["serve", "--model", "efficientnet_lite0", "--poll_s", "5"], "--poll_s says how often to look at a model "
                                                                   "repository: give it with --zoo DIR"),
])
def test_user_mistakes_print_error_and_exit_2(argv, message):
    proc = beamzoo(*argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, words", [
    (["serve", "--model", "efficientnet_lite0", "--colour", "red"], "unrecognized arguments: --colour red"),
    (["serve", "--model", "efficientnet_lite0", "--max_b", "4"], "unrecognized arguments: --max_b 4"),
    (["serve", "--max_batch", "0"], "argument --max_batch: must be between 1 and 65536, got 0"),
    (["serve", "--max_delay_ms", "soon"], "argument --max_delay_ms: 'soon' is not a number"),
    (["serve", "--zoo", ".", "--poll_s", "-1"], "argument --poll_s: must be >= 0s, got -1s")])
def test_unknown_or_bad_options_are_refused_in_one_line(argv, words):
    proc = beamzoo(*argv)
    assert proc.returncode == 2 and words in error_line(proc.stderr), proc.stderr


def test_a_taken_port_is_an_error_not_a_traceback():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        proc = beamzoo("serve", "--model", "efficientnet_lite0", "--port", s.getsockname()[1], "--workers", "1")
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot listen on 127.0.0.1:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_taken_grpc_port_is_an_error_not_a_traceback():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = beamzoo("serve", "--model", "efficientnet_lite0", "--port", "0", "--grpc_port", port, "--workers", "1")
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc.stderr) == (f"error: cannot listen on 127.0.0.1:{port} for gRPC: the port is taken, "
                                       "or the address is not this machine's"), proc.stderr


def test_grpc_port_serves_kserve_v2_over_grpc_beside_http_until_sigterm():
    grpcclient = pytest.importorskip("tritonclient.grpc")
    proc = subprocess.Popen([sys.executable, "-m", "beamzoo.cli", "serve", "--model", "efficientnet_lite0",
                             "--workers", "1", "--port", "0", "--grpc_port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"listening on http://\S+ and gRPC on (\S+) \(efficientnet_lite0:1\)", line)
        assert m, line
        client = grpcclient.InferenceServerClient(m.group(1))
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([sample_files()[0].read_bytes()], dtype=object))
        result = client.infer("efficientnet_lite0", [image])
        assert result.as_numpy("model")[0] == b"efficientnet_lite0:1" and result.as_numpy("score")[0] > 0
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "beamzoo serve: stopped" in proc.stderr.read()


@pytest.mark.integration
def test_sigterm_answers_every_accepted_request_then_exits_0():
    proc, url = start("--model", "efficientnet_lite0", "--workers", "1", "--max_delay_ms", "1500")
    try:
        image = sample_files()[0].read_bytes()
        answers = []

        def one():
            with Client(url) as c:
                answers.append(c.request("POST", "/v1/models/efficientnet_lite0:predict",
                                         {"instances": [{"b64": base64.b64encode(image).decode()}]}))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        with Client(url) as c:  # all four wait in the queue for their 1.5 s batch delay
            deadline = time.monotonic() + 20
            while metric(c.request("GET", "/metrics")[1], "beamzoo_queue_rows") < 4:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        assert [a[0] for a in answers] == [200] * 4
        assert all(a[1]["predictions"][0]["label"] == "tiger cat" for a in answers), answers
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "still listening after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.integration
def test_a_bundle_is_served_with_the_rows_of_the_model(tmp_path):
    bundle = export(score_images(str(tmp_path / "in" / "*.jpg"), str(tmp_path / "out")), tmp_path / "bundle")
    proc, url = start("--bundle", bundle, "--workers", "1")
    try:
        files = sample_files()[:3]
        with Client(url) as c:
            preds = c.predict("efficientnet_lite0", files)
            status, meta = c.request("GET", "/v1/models/efficientnet_lite0/versions/1")
        from beamzoo.serve.models import Servable
        from beamzoo.serve.server import Server
        running = Server([Servable.from_model("efficientnet_lite0")], workers=1).start()
        try:
            with Client(running.url) as c:
                direct = c.predict("efficientnet_lite0", files)
        finally:
            running.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert status == 200 and meta["model_version_status"][0]["state"] == "AVAILABLE"
    assert [p["label"] for p in preds] == [p["label"] for p in direct]
    assert all(abs(a - b) <= 1e-5 for p, q in zip(preds, direct) for a, b in zip(p["topk_scores"], q["topk_scores"]))


def test_the_docs_serve_commands_use_real_options():
    import shlex
    from beamzoo.cli import parser
    section = (ROOT / "docs" / "serving.md").read_text()
    cmds = [ln.split("#")[0].rstrip(" &") for ln in section.splitlines() if ln.startswith("beamzoo serve")]
    assert len(cmds) >= 2
    for cmd in cmds:
        args = parser().parse_args(shlex.split(cmd)[1:])  # exits (fails the test) on an unknown option
        assert args.model or args.bundle or args.zoo, cmd


def test_the_listening_socket_is_tcp_so_asyncio_sets_nodelay():
    from beamzoo.serve.server import listen
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # else every answer waits for a delayed ACK (~40 ms)
    finally:
        sock.close()


def test_a_repository_is_served_and_changed_on_request(tmp_path):
    from tests.test_serve_repository import add_version
    repo = tmp_path / "repo"
    add_version(repo, "1")
    add_version(repo, "1", name="bad", corrupt=True)
    proc = beamzoo("serve", "--zoo", repo, "--model", "bad", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert "refused bad:1: model file" in proc.stderr and "bad is not served" in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"error: --model bad: no version of it in the repository {repo} could "
                                            "be served (the lines above say why)"), proc.stderr
    shutil.rmtree(repo / "bad")
    proc, url = start("--zoo", repo, "--poll_s", "0", "--workers", "1")
    try:
        image = {"b64": base64.b64encode(sample_files()[0].read_bytes()).decode()}
        with Client(url) as c:
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [image]})
            assert status == 200 and body["predictions"][0]["model"] == "tiny_colour:1", body
            add_version(repo, "2")
            assert c.request("POST", "/v2/repository/models/tiny_colour/load") == (
                200, {"name": "tiny_colour", "versions": ["1", "2"]})
            status, body = c.request("POST", "/v1/models/tiny_colour:predict", {"instances": [image]})
            assert status == 200 and body["predictions"][0]["model"] == "tiny_colour:2", body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

"""The Redis stream queue against a real redis-server (the Debian package; .ci/run installs it)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beamzoo.serve import Servable, Server
from beamzoo.serve.redis_queue import GROUP, QueueClient, RedisQueueFull, result_key
from conftest import tiny_card, tiny_colour_model, write_colour_image

redis = pytest.importorskip("redis", reason="the Redis client ships in the serve extra (pip install -e '.[serve]')")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A redis-server of its own: no persistence, a free port, stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:  # a fresh machine: the project's own script installs the Debian package
        got = subprocess.run([os.path.join(ROOT, ".ci", "install-redis")], capture_output=True, text=True)
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip(f"redis-server is not installed and .ci/install-redis could not install it: "
                        f"{got.stderr.strip()}")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def images(tmp_path):
    return {c: open(write_colour_image(tmp_path / f"{c}.png", rgb), "rb").read()
            for c, rgb in (("red", (230, 20, 20)), ("green", (20, 230, 20)), ("blue", (20, 20, 230)))}


@pytest.fixture
def tiny_server(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    server = Server([Servable.from_model(card)], max_batch=4, max_delay_ms=2, workers=1)
    yield server
    server.close()


def test_enqueued_images_are_answered_by_uri(redis_url, images, tiny_server, request):
    stream = request.node.name
    client = QueueClient(redis_url, stream)
    client.enqueue("before-start", images["red"])  # waiting before the server reads the stream
    tiny_server.consume(redis_url, stream)
    colours = ["red", "green", "blue"] * 4
    for i, c in enumerate(colours):
        client.enqueue(f"img-{i}", images[c])
    client.enqueue("junk", b"not an image at all")
    assert client.query("before-start", timeout=30)["label"] == "red"
    for i, c in enumerate(colours):
        answer = client.query(f"img-{i}", timeout=30)
        assert answer["label"] == c and answer["model"] == "tiny_colour:1", answer
    junk = client.query("junk", timeout=30)
    assert junk["stage"] == "decode" and "not an image" in junk["error"]
    assert client.query("never-sent") is None
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(stream) == 0, "answered entries are deleted from the stream"
    assert r.xpending(stream, GROUP)["pending"] == 0


def test_entries_without_data_or_for_an_unknown_model_get_an_error(redis_url, images, tiny_server, request):
    stream = request.node.name
    r = redis.Redis.from_url(redis_url)
    client = QueueClient(redis_url, stream)
    tiny_server.consume(redis_url, stream)
    r.xadd(stream, {"uri": "no-data"})
    client.enqueue("other-model", images["red"], model="nope")
    client.enqueue("named", images["blue"], model="tiny_colour:1")
    assert "needs a uri and data" in client.query("no-data", timeout=30)["error"]
    assert "no model named 'nope'" in client.query("other-model", timeout=30)["error"]
    assert client.query("named", timeout=30)["label"] == "blue"


def test_enqueue_refuses_when_redis_memory_is_nearly_full(redis_url, images, request):
    r = redis.Redis.from_url(redis_url)
    client = QueueClient(redis_url, request.node.name)
    used = r.info("memory")["used_memory"]
    try:
        r.config_set("maxmemory", str(int(used / 0.7)))  # 70 % used
        with pytest.raises(RedisQueueFull, match="over 60%"):
            client.enqueue("refused", images["red"])
        assert r.xlen(request.node.name) == 0
        r.config_set("maxmemory", str(used * 10))
        client.enqueue("accepted", images["red"])
        assert r.xlen(request.node.name) == 1
    finally:
        r.config_set("maxmemory", "0")


@pytest.mark.integration
def test_a_consumer_killed_mid_stream_and_started_again_answers_every_request_exactly_once(redis_url, request):
    from beamzoo.samples import sample_files
    stream = request.node.name
    client = QueueClient(redis_url, stream)
    files = sample_files()
    n = 60
    for i in range(n):
        client.enqueue(f"img-{i}", files[i % len(files)])

    def start():
        return subprocess.Popen([sys.executable, "-m", "beamzoo.cli", "serve", "--model", "efficientnet_lite0",
                                 "--port", "0", "--workers", "1", "--max_batch", "4", "--redis", redis_url,
                                 "--stream", stream, "--consumer", "edge-1"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    r = redis.Redis.from_url(redis_url)

    def answered() -> int:
        return sum(r.exists(result_key(stream, f"img-{i}")) for i in range(n))

    proc = start()
    try:
        deadline = time.monotonic() + 120
        while answered() < 8:
            assert proc.poll() is None and time.monotonic() < deadline, "the consumer answered nothing"
            time.sleep(0.01)
        time.sleep(0.05)  # into the next batch (four photos take longer than that on one thread)
        proc.send_signal(signal.SIGKILL)  # mid-stream: entries in hand are neither answered nor acknowledged
        proc.wait(30)
        assert answered() < n, "the consumer finished before it was killed; enqueue more"
        assert r.xpending(stream, GROUP)["pending"] > 0, "nothing was in hand when it was killed"
        proc = start()
        deadline = time.monotonic() + 180
        while answered() < n:
            assert proc.poll() is None and time.monotonic() < deadline, f"{answered()} of {n} answered"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    counts = [int(r.hget(result_key(stream, f"img-{i}"), "answers")) for i in range(n)]
    assert counts == [1] * n, f"answered more than once: {[i for i, c in enumerate(counts) if c != 1]}"
    labels = {}
    for i in range(n):
        labels.setdefault(files[i % len(files)].name, set()).add(client.query(f"img-{i}")["label"])
    assert all(len(v) == 1 for v in labels.values()), labels
    assert labels["chelsea.png"] == {"tiger cat"}
    assert r.xpending(stream, GROUP)["pending"] == 0 and r.xlen(stream) == 0


def test_serve_refuses_an_unreachable_redis():
    proc = subprocess.run([sys.executable, "-m", "beamzoo.cli", "serve", "--model", "efficientnet_lite0",
                           "--workers", "1", "--redis", f"redis://127.0.0.1:{free_port()}/0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot use the Redis stream 'beamzoo'"), \
        proc.stderr

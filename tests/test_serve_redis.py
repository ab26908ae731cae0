"""The Redis stream queue against a real redis-server (the Debian package; .ci/run installs it)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from beamzoo.serve.models import Servable
from beamzoo.serve.server import Server
from beamzoo.serve.redis_queue import _READ, BACKOFF_S, GROUP, QueueClient, RedisQueueFull, backoff_s, result_key
from conftest import debian_tool, tiny_card, tiny_colour_model, write_colour_image

redis = pytest.importorskip("redis", reason="the Redis client ships in the serve extra (pip install -e '.[serve]')")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    return debian_tool("redis-server")


def start_redis(port: int, folder) -> subprocess.Popen:
    """A redis-server without persistence on ``port``, answering once this returns."""
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + 20
    while True:
        try:
            r.ping()
            return proc
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A redis-server of its own: no persistence, a free port, stopped afterwards."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
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
    assert junk["stage"] == "classify/decode" and "not an image" in junk["error"]
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


def wait_for(what, check, timeout=60.0):
    """Poll ``check`` until it is true; a bound whose passing means a hang."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:g} s"
        time.sleep(0.02)


def http_ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=10) as got:
            return got.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_redis_restarted_without_persistence_is_served_again(tmp_path, images, tiny_server, capsys):
    port, stream = free_port(), "restarted"
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis(port, tmp_path)
    running = tiny_server.start()
    try:
        consumer = tiny_server.consume(url, stream)
        client = QueueClient(url, stream)
        client.enqueue("before", images["red"])
        assert client.query("before", timeout=30)["label"] == "red"
        assert http_ready(running.url) == 200
        proc.kill()
        proc.wait(30)
        wait_for("not ready while Redis is away", lambda: http_ready(running.url) == 503)
        assert not tiny_server.ready and not consumer.ready
        time.sleep(1.5)  # an outage of several tries (0.05 s, 0.1 s, ... apart): still one log line
        assert http_ready(running.url) == 503
        proc = start_redis(port, tmp_path)  # empty: the stream and its group are gone
        client = QueueClient(url, stream)
        colours = ["red", "green", "blue"] * 10
        for i, c in enumerate(colours):
            client.enqueue(f"after-{i}", images[c])
        answers = [client.query(f"after-{i}", timeout=60) for i in range(len(colours))]
        assert [a and a.get("label") for a in answers] == colours, answers
        wait_for("ready once Redis is back", lambda: http_ready(running.url) == 200)
        assert tiny_server.ready
        r = redis.Redis.from_url(url)
        assert r.xlen(stream) == 0 and r.xpending(stream, GROUP)["pending"] == 0
    finally:
        running.stop()
        proc.kill()
        proc.wait(30)
    log = capsys.readouterr().out.splitlines()
    assert len([x for x in log if "not ready" in x]) == 1, log
    assert len([x for x in log if "reachable again" in x]) == 1, log


def test_a_stream_deleted_while_served_gets_its_group_again(redis_url, images, tiny_server, request):
    stream = request.node.name
    client = QueueClient(redis_url, stream)
    tiny_server.consume(redis_url, stream)
    client.enqueue("first", images["red"])
    assert client.query("first", timeout=30)["label"] == "red"
    redis.Redis.from_url(redis_url).delete(stream)  # the group goes with it
    client.enqueue("second", images["blue"])
    assert client.query("second", timeout=30)["label"] == "blue"
    assert tiny_server.ready


def test_an_oversized_entry_gets_an_error_and_never_leaves_redis(redis_url, images, tmp_path, request):
    stream = request.node.name
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    server = Server([Servable.from_model(card)], max_batch=4, max_delay_ms=2, workers=1, max_body_bytes=64 << 10)
    r = redis.Redis.from_url(redis_url)
    client = QueueClient(redis_url, stream)
    try:
        sent = r.info("stats")["total_net_output_bytes"]
        r.xadd(stream, {"uri": "huge", "data": b"x" * (4 << 20)})
        long_uri = r.xadd(stream, {"uri": "y" * 5000, "data": b"x" * (1 << 20)}).decode()  # answered by entry id
        client.enqueue("after", images["green"])
        server.consume(redis_url, stream)
        assert client.query("after", timeout=30)["label"] == "green"
        huge = client.query("huge", timeout=30)
        assert huge == {"error": f"the entry is {(4 << 20) + 11} bytes, over the limit of {64 << 10} bytes "
                                 "(--max_body_bytes); send a smaller image", "stage": "request"}, huge
        assert "over the limit" in client.query(long_uri, timeout=30)["error"]
        assert r.xlen(stream) == 0 and r.xpending(stream, GROUP)["pending"] == 0
        out = r.info("stats")["total_net_output_bytes"] - sent
        assert out < (1 << 20), f"Redis sent {out} bytes: an oversized entry was read whole"
        assert server.ready
    finally:
        server.close()


def test_a_read_takes_at_most_count_entries_and_stops_at_its_byte_budget(redis_url, request):
    stream = request.node.name
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(10):
        r.xadd(stream, {"uri": f"e{i}", "data": b"x" * 1000})
    read = r.register_script(_READ)
    # count 4, budget 100 kB: four entries
    assert [e[1][1] for e in read(keys=[stream], args=[GROUP, "c", ">", 4, 100_000, 100_000, 0])] == \
        [b"e0", b"e1", b"e2", b"e3"]
    # budget 2500 bytes (entries of 1009): the read stops at the third, which passes it
    assert len(read(keys=[stream], args=[GROUP, "c", ">", 8, 2500, 100_000, 0])) == 3
    # entries of 1009 bytes over a cap of 1000: their data stays in Redis, their size comes instead
    got = read(keys=[stream], args=[GROUP, "c", ">", 8, 100_000, 1000, 0])
    assert got[0][1] == [b"oversize", b"1009", b"uri", b"e7"] and len(got) == 3
    pending = read(keys=[stream], args=[GROUP, "c", "0", 20, 10_000_000, 10_000_000, 0])
    assert len(pending) == 10 and pending[0][1][1] == b"e0"  # what "c" holds, from the first


def test_enqueue_refuses_an_entry_over_max_bytes(redis_url, request):
    stream = request.node.name
    client = QueueClient(redis_url, stream, max_bytes=1000)
    with pytest.raises(ValueError, match=r"the entry is 1010 bytes, over the limit of 1000 \(max_bytes"):
        client.enqueue("big", b"x" * 1000)
    client.enqueue("small", b"x" * 900)
    assert redis.Redis.from_url(redis_url).xlen(stream) == 1


def test_the_backoff_doubles_to_a_bound():
    waits = [backoff_s(n) for n in range(1, 40)]
    assert waits[0] == BACKOFF_S[0] and waits[1] == 2 * BACKOFF_S[0]
    assert waits == sorted(waits) and max(waits) == BACKOFF_S[1] == waits[-1]

"""Models that change while served: a watched repository folder over real sockets on 127.0.0.1,
versions going live and retired, cards refused, the repository API, no request lost across a swap."""
from __future__ import annotations

import base64
import shutil
import threading

import pytest

from beamzoo.serve.client import Client
from beamzoo.serve.models import Servable, UnknownServable
from beamzoo.serve.server import Server
from conftest import tiny_card, tiny_colour_model, write_colour_image
from tests.test_zoo import write_card

NAME = "tiny_colour"


def add_version(repo, version: str, name: str = NAME, corrupt: bool = False):
    """``repo/name/version``: the tiny colour model and its card; ``corrupt``: the model file then
    changed, so it no longer has the sha256 its card pins."""
    d = repo / name / version
    d.mkdir(parents=True)
    model = tiny_colour_model(d / "tiny.onnx")
    write_card(d, model, name=name, version=version)
    if corrupt:
        with open(model, "ab") as f:
            f.write(b"\0")
    return d


@pytest.fixture
def red(tmp_path):
    return open(write_colour_image(tmp_path / "red.png", (230, 20, 20)), "rb").read()


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    add_version(r, "1")
    return r


@pytest.fixture
def served(repo):
    """A server of the repository (looked at only when asked) and its URL."""
    server = Server([], max_batch=4, max_delay_ms=1, workers=2)
    server.watch(repo, poll_s=0)
    running = server.start()
    yield running
    running.stop()


def infer(c: Client, image: bytes, version: str | None = None, name: str = NAME):
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    data = [base64.b64encode(image).decode()]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": data}]}
    return c.request("POST", path, body)


def answered_by(c: Client, image: bytes, version: str | None = None) -> tuple[str, str]:
    """(model_version, the ``model`` column) of a 200 answer."""
    status, body = infer(c, image, version)
    assert status == 200, body
    outs = {o["name"]: o for o in body["outputs"]}
    assert outs["label"]["data"] == ["red"]
    return body["model_version"], outs["model"]["data"][0]


def index(c: Client, **body) -> dict[tuple[str, str], tuple[str, str]]:
    status, rows = c.request("POST", "/v2/repository/index", body)
    assert status == 200, rows
    return {(r["name"], r["version"]): (r["state"], r["reason"]) for r in rows}


def test_a_new_version_goes_live_and_a_removed_one_stops_being_served(served, repo, red):
    watcher = served.server.repository
    with Client(served.url) as c:
        assert answered_by(c, red) == ("1", "tiny_colour:1")
        add_version(repo, "2")
        assert watcher.scan() == {}
        assert answered_by(c, red) == ("2", "tiny_colour:2")  # the name alone moved to it
        assert answered_by(c, red, "1") == ("1", "tiny_colour:1")  # the exact version still serves
        shutil.rmtree(repo / NAME / "1")
        watcher.scan()
        status, body = infer(c, red, "1")
        assert status == 404 and "has no version '1'" in body["error"], body
        assert answered_by(c, red) == ("2", "tiny_colour:2")
        assert c.request("GET", f"/v2/models/{NAME}")[1]["versions"] == ["2"]
    with pytest.raises(UnknownServable):
        served.server.lookup(NAME, "1")


def test_a_retired_version_gives_its_onnxruntime_session_back(served, repo, red):
    from beamzoo.core import resources

    def sessions(ref):  # versions no other test makes: a session of theirs would be kept for the process
        return [k for k in resources.held() if isinstance(k, tuple) and k and k[0] == ref]

    with Client(served.url) as c:
        for v in ("71", "72"):
            add_version(repo, v)
            served.server.repository.scan()
            assert answered_by(c, red) == (v, f"tiny_colour:{v}")
        assert sessions("tiny_colour:71") and sessions("tiny_colour:72")
        shutil.rmtree(repo / NAME / "71")
        served.server.repository.scan()
        for t in served.server._retiring:
            t.join(60)
        assert sessions("tiny_colour:71") == []  # a server that swaps versions for weeks does not grow
        assert sessions("tiny_colour:72") and answered_by(c, red) == ("72", "tiny_colour:72")


def test_a_card_that_does_not_verify_is_refused_and_the_version_before_serves_on(served, repo, red, capsys):
    watcher = served.server.repository
    add_version(repo, "2")
    watcher.scan()
    bad = add_version(repo, "3", corrupt=True)
    capsys.readouterr()
    refused = watcher.scan()
    assert list(refused) == [(NAME, "3")] and "has sha256" in refused[(NAME, "3")], refused
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "refused tiny_colour:3: model file" in lines[0], lines
    assert lines[0].endswith("tiny_colour serves versions 1, 2"), lines
    with Client(served.url) as c:
        assert answered_by(c, red) == ("2", "tiny_colour:2")
        rows = index(c)
        assert rows[(NAME, "3")][0] == "UNAVAILABLE" and "the file is corrupt" in rows[(NAME, "3")][1], rows
        assert rows[(NAME, "2")] == ("READY", "") and rows[(NAME, "1")] == ("READY", "")
        assert watcher.scan() == {} and capsys.readouterr().err == ""  # refused once, not at every look
        tiny_colour_model(bad / "tiny.onnx")  # the right file now: its folder changed, it is tried again
        assert watcher.scan() == {}
        assert answered_by(c, red) == ("3", "tiny_colour:3")
        assert index(c)[(NAME, "3")] == ("READY", "")


def test_a_card_in_the_wrong_folder_is_refused_naming_the_folder(served, repo):
    d = repo / NAME / "4"
    d.mkdir()
    write_card(d, tiny_colour_model(d / "tiny.onnx"), version="5")
    refused = served.server.repository.scan()
    assert "the card says tiny_colour:5, but it lies in tiny_colour/4/" in refused[(NAME, "4")]
    assert served.server.catalog.versions(NAME) == ["1"]


def test_the_repository_api_lists_loads_and_unloads(served, repo, red):
    watcher = served.server.repository
    with Client(served.url) as c:
        assert "model_repository" in c.request("GET", "/v2")[1]["extensions"]
        assert index(c) == {(NAME, "1"): ("READY", "")}
        add_version(repo, "2")  # not looked at yet: loading the name looks
        assert c.request("POST", f"/v2/repository/models/{NAME}/load") == (200, {"name": NAME, "versions": ["1", "2"]})
        assert answered_by(c, red) == ("2", "tiny_colour:2")
        status, body = c.request("POST", "/v2/repository/models/nope/load")
        assert status == 404 and body["error"].startswith("no model named 'nope' in the repository "), body
        add_version(repo, "3", corrupt=True)
        status, body = c.request("POST", f"/v2/repository/models/{NAME}/load")
        assert status == 400 and "tiny_colour:3 is refused: model file" in body["error"], body
        assert body["error"].endswith("tiny_colour serves versions 1, 2"), body
        assert answered_by(c, red) == ("2", "tiny_colour:2")
        shutil.rmtree(repo / NAME / "3")

        unloaded = c.request("POST", f"/v2/repository/models/{NAME}/unload")
        assert unloaded == (200, {"name": NAME, "versions": ["1", "2"]})
        status, body = infer(c, red)
        assert status == 404 and "no model named 'tiny_colour' is served" in body["error"], body
        rows = index(c)
        assert [r[0] for r in rows.values()] == ["UNAVAILABLE"] * 2 and "unloaded on request" in rows[(NAME, "1")][1]
        assert index(c, ready=True) == {}
        watcher.scan()  # an unloaded model is not served again by a look at the folder
        assert infer(c, red)[0] == 404
        status, body = c.request("POST", f"/v2/repository/models/{NAME}/unload")
        assert status == 200 and body["versions"] == []  # nothing served, still in the repository

        assert c.request("POST", f"/v2/repository/models/{NAME}/load") == (200, {"name": NAME, "versions": ["1", "2"]})
        assert answered_by(c, red) == ("2", "tiny_colour:2")
        status, body = c.request("POST", "/v2/repository/models/nope/unload")
        assert status == 404 and "no model named 'nope' is served" in body["error"], body
        status, body = c.request("POST", f"/v2/repository/models/{NAME}/load", {"parameters": {"config": "{}"}})
        assert status == 400 and "takes no fields, not 'parameters'" in body["error"], body
        status, body = c.request("POST", "/v2/repository/index", {"ready": "yes"})
        assert status == 400 and "'ready' must be true or false" in body["error"], body
        status, body = c.request("GET", "/v2/repository/index")
        assert status == 405 and set(body) == {"error"}, body


def test_without_a_repository_load_and_unload_say_so(tmp_path, red):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    running = Server([Servable.from_model(card)], max_batch=4, workers=1).start()
    try:
        with Client(running.url) as c:
            for change in ("load", "unload"):
                status, body = c.request("POST", f"/v2/repository/models/{NAME}/{change}")
                assert status == 400 and body["error"].startswith("this server has no model repository"), body
                assert body["error"].endswith("start it with --zoo DIR")
            assert index(c) == {(NAME, "1"): ("READY", "")}
            assert answered_by(c, red) == ("1", "tiny_colour:1")  # still served
    finally:
        running.stop()


def test_only_the_models_named_are_served_until_another_is_loaded(tmp_path, red):
    repo = tmp_path / "repo"
    add_version(repo, "1")
    add_version(repo, "1", name="other")
    server = Server([], max_batch=4, workers=1)
    server.watch(repo, only=[NAME], poll_s=0)
    running = server.start()
    try:
        with Client(running.url) as c:
            rows = index(c)
            assert rows[(NAME, "1")] == ("READY", "") and rows[("other", "1")][0] == "UNAVAILABLE"
            assert "serves only the --model names" in rows[("other", "1")][1]
            assert infer(c, red, name="other")[0] == 404
            assert c.request("POST", "/v2/repository/models/other/load")[0] == 200
            assert infer(c, red, name="other")[0] == 200
            add_version(repo, "2", name="other")
            server.repository.scan()  # once loaded, it is followed
            assert server.catalog.versions("other") == ["1", "2"]
    finally:
        running.stop()


def test_the_poll_thread_looks_at_the_folder_by_itself(repo):
    server = Server([], max_batch=4, workers=1)
    watcher = server.watch(repo, poll_s=0.01)
    try:
        add_version(repo, "2")
        pause = threading.Event()  # never set: its wait is a pause between checks
        for _ in range(6000):  # a bound against a hang, not a verdict on speed
            if server.catalog.versions(NAME)[-1] == "2":
                break
            pause.wait(0.01)
        assert server.catalog.versions(NAME) == ["1", "2"], "the poll thread never served version 2"
    finally:
        server.close()
    assert not watcher.thread.is_alive()


def test_no_request_is_lost_or_failed_across_a_swap(repo, red):
    """Client threads send requests all the while versions are swapped: in two looks (add 2, look,
    remove 1, look), in one (add 3 and remove 2, look), and back (add 2 again and remove 3, look).
    Every request gets a 200, and each thread sees the versions in the order they were served."""
    server = Server([], max_batch=4, max_delay_ms=2, workers=2)
    watcher = server.watch(repo, poll_s=0)
    running = server.start()
    n = 30  # requests answered before each swap, and after the last
    lock = threading.Lock()
    done: list[tuple[int, int, object]] = []  # (thread, status, model_version or the error body)
    goal = [n]
    reached, stop = threading.Event(), threading.Event()

    def send(i: int) -> None:
        with Client(running.url) as c:
            while not stop.is_set():
                status, body = infer(c, red)
                with lock:
                    done.append((i, status, body["model_version"] if status == 200 else body))
                    if len(done) >= goal[0]:
                        reached.set()

    def answered_more() -> None:
        assert reached.wait(120), f"the clients got no more answers after {len(done)}"
        with lock:
            reached.clear()
            goal[0] = len(done) + n

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        answered_more()
        add_version(repo, "2")
        assert watcher.scan() == {}
        shutil.rmtree(repo / NAME / "1")
        watcher.scan()
        answered_more()
        add_version(repo, "3")
        shutil.rmtree(repo / NAME / "2")
        assert watcher.scan() == {}  # one look: 3 is served before 2 is retired
        answered_more()
        add_version(repo, "2")
        shutil.rmtree(repo / NAME / "3")
        assert watcher.scan() == {}  # back: the name alone moves to the newest left
        answered_more()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        running.stop()
    failed = [d for d in done if d[1] != 200]
    assert not failed, failed[:5]
    assert {v for _, _, v in done} == {"1", "2", "3"}
    served = ["1", "2", "3", "2"]  # the newest version, swap after swap
    for i in range(len(threads)):
        versions = [v for j, _, v in done if j == i]
        at = 0
        for v in versions:  # each answer by the version served then, or by one served later
            while at < len(served) and served[at] != v:
                at += 1
            assert at < len(served), (i, versions)
        assert versions[-1] == "2", (i, versions)
    assert len(done) >= 4 * n
    assert server.catalog.versions(NAME) == ["2"]


# ---------------------------------------------------------------- the Redis consumer

class RetiresOnLookup(Server):
    """Retires version 1 right after a lookup handed out its service, before anything is queued
    on it: the race a consumer must survive."""

    swap: Servable | None = None

    def service_for(self, model=None):
        service = super().service_for(model)
        if self.swap is not None and service.servable.version == "1":
            v2, self.swap = self.swap, None
            self.load(v2)
            self.unload(NAME, "1")
            service.close()  # closed now, not a moment later in the background
        return service


def test_a_queued_entry_moves_to_the_new_version_when_its_version_is_retired_as_it_is_queued(tmp_path, red):
    pytest.importorskip("redis", reason="the Redis client ships in the serve extra (pip install -e '.[serve]')")
    from beamzoo.serve.redis_queue import GROUP, QueueClient
    from tests.test_serve_redis import free_port, start_redis
    import redis

    port = free_port()
    proc = start_redis(port, tmp_path)
    path = tiny_colour_model(tmp_path / "tiny.onnx")
    server = RetiresOnLookup([Servable.from_model(tiny_card(path))], max_batch=4, max_delay_ms=1, workers=1)
    server.swap = Servable.from_model(tiny_card(path, version="2"))
    url = f"redis://127.0.0.1:{port}/0"
    try:
        server.consume(url, "swap", claim_idle_s=3600)  # a pending entry is not claimed again within the test
        client = QueueClient(url, "swap")
        client.enqueue("a", red)
        answer = client.query("a", timeout=60)
        assert server.swap is None, "version 1 was never looked up"
        assert answer is not None, "the entry was left unanswered when its version was retired"
        assert answer["label"] == "red" and answer["model"] == "tiny_colour:2", answer
        assert redis.Redis.from_url(url).xpending("swap", GROUP)["pending"] == 0
    finally:
        server.close()
        proc.terminate()
        proc.wait(10)

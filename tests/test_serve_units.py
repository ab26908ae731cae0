"""Serving without a server: the batcher's state machine (a fake clock), the served graph, the protocols."""
from __future__ import annotations

import base64
import threading

import numpy as np
import pyarrow as pa
import pytest

from beamzoo.core.graph import GraphError
from beamzoo.pipeline import score_images
from beamzoo.serve import protocol as P
from beamzoo.serve.batcher import BatchLoop, Batcher, Closed, QueueFull
from beamzoo.core import RunContext
from beamzoo.runners.inline import Engine
from beamzoo.serve.graph import serving_ends
from beamzoo.serve.models import Catalog, Servable, UnknownServable, signature
from conftest import COLOURS, tiny_card, tiny_colour_model, write_colour_image


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- batcher


def test_a_full_batch_is_due_at_once_and_no_bigger_than_max_batch():
    clock = Clock()
    b = Batcher(max_batch=4, max_delay=0.5, max_queue=100, clock=clock)
    b.offer(list("abc"))
    assert b.due_in() == pytest.approx(0.5) and b.take() == []
    b.offer(list("def"))  # 6 waiting, 4 make a batch: the two requests' rows in turn
    assert b.due_in() == 0.0
    assert [r.item for r in b.take()] == list("adbe")
    assert len(b) == 2 and b.due_in() == pytest.approx(0.5)  # "c" and "f" came at the same time: not due yet


def test_the_oldest_row_is_due_after_max_delay():
    clock = Clock()
    b = Batcher(max_batch=8, max_delay=0.010, max_queue=100, clock=clock)
    assert b.due_in() is None
    b.offer(["a"])
    clock.t += 0.004
    b.offer(["b"])
    assert b.due_in() == pytest.approx(0.006)
    clock.t += 0.006
    rows = b.take()
    assert [r.item for r in rows] == ["a", "b"]
    assert rows[0].enqueued == pytest.approx(100.0) and rows[1].enqueued == pytest.approx(100.004)
    assert b.due_in() is None


def test_a_request_is_queued_whole_or_refused_whole():
    b = Batcher(max_batch=2, max_delay=1, max_queue=5, clock=Clock())
    b.offer(list("abc"))
    with pytest.raises(QueueFull, match="holds 3 of at most 5 rows; this request brings 3"):
        b.offer(list("xyz"))
    assert len(b) == 3
    b.offer(list("de"))
    assert len(b) == 5


def test_closing_makes_what_waits_due_and_refuses_new_rows():
    b = Batcher(max_batch=4, max_delay=60, max_queue=10, clock=Clock())
    b.offer(["a"])
    b.close()
    with pytest.raises(Closed):
        b.offer(["b"])
    assert [r.item for r in b.take()] == ["a"]
    assert b.due_in() is None


def test_batcher_refuses_nonsense_limits():
    with pytest.raises(ValueError):
        Batcher(max_batch=0, max_delay=0, max_queue=1)


def test_a_small_request_after_a_big_one_is_in_the_next_batch():
    clock = Clock()
    b = Batcher(max_batch=8, max_delay=0.005, max_queue=200, clock=clock)
    b.offer([("A", i) for i in range(100)])
    first = b.take()  # a batch of A's is cut (and running) when B comes
    clock.t += 0.001
    b.offer([("B", 0)])
    batches = [first]
    while len(b):
        clock.t += 1
        batches.append(b.take())
    with_b = [i for i, batch in enumerate(batches) if ("B", 0) in [r.item for r in batch]]
    assert with_b == [1], f"B's row came in batch {with_b} of {len(batches)}"
    a_rows = [r.item for batch in batches for r in batch if r.item[0] == "A"]
    assert a_rows == [("A", i) for i in range(100)]  # A's rows keep their order, none lost
    assert all(len(batch) <= 8 for batch in batches)


def test_batches_take_the_waiting_requests_rows_in_turn():
    b = Batcher(max_batch=6, max_delay=0, max_queue=100, clock=Clock())
    b.offer(["a1", "a2", "a3", "a4"])
    b.offer(["b1"])
    b.offer(["c1", "c2"])
    assert [r.item for r in b.take()] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert [r.item for r in b.take()] == ["a4"] and len(b) == 0


def test_dropping_a_request_forgets_its_rows_not_yet_taken():
    clock = Clock()
    b = Batcher(max_batch=4, max_delay=10, max_queue=12, clock=clock)
    a = b.offer([f"a{i}" for i in range(10)])
    c = b.offer(["c1", "c2"])
    assert [r.item for r in b.take()] == ["a0", "c1", "a1", "c2"]
    assert b.drop(a) == 8 and len(b) == 0 and b.due_in() is None
    assert b.drop(a) == 0 and b.drop(c) == 0  # gone already, or all taken
    b.offer([f"d{i}" for i in range(12)])  # the dropped rows' room is free again
    assert len(b) == 12


def test_the_batch_loop_serves_a_late_small_request_in_the_batch_after_the_running_one():
    started, release = threading.Event(), threading.Event()
    batches = []

    def run(rows, worker):
        batches.append([r.item for r in rows])
        started.set()
        release.wait(30)  # the first batch runs until the small request is queued

    loop = BatchLoop(Batcher(max_batch=4, max_delay=0, max_queue=200), run, workers=1)
    try:
        loop.offer([("A", i) for i in range(64)])
        assert started.wait(30)
        loop.offer([("B", 0)])
        release.set()
    finally:
        loop.close(60)
    with_b = [i for i, batch in enumerate(batches) if ("B", 0) in batch]
    assert with_b == [1], f"B's row ran in batch {with_b} of {len(batches)}"
    assert sum(len(batch) for batch in batches) == 65


def test_a_server_refuses_a_bytes_in_flight_cap_below_the_body_limit(tmp_path):
    from beamzoo.serve.server import Server
    servable = Servable.from_model(tiny_card(tiny_colour_model(tmp_path / "tiny.onnx")))
    with pytest.raises(ValueError, match=r"--max_inflight_bytes \(1048576\) is below --max_body_bytes"):
        Server([servable], max_body_bytes=2 << 20, max_inflight_bytes=1 << 20)


# ---------------------------------------------------------------- the served graph


def test_serving_graph_keeps_every_step_between_the_ends(tmp_path):
    g = score_images(str(tmp_path / "*.jpg"), str(tmp_path / "out"))
    served = serving_ends(g)
    inner = [s for s in g.steps if s.kind == "map" and s.op != "read_files"]
    assert [s for s in served.steps if s.kind == "map"][1:] == inner[1:]  # same params, same inputs
    first = next(s for s in served.steps if s.kind == "map")
    assert first.op == "decode_image" and first.inputs == ("requests",)
    assert [s.op for s in served.steps if s.kind in ("source", "sink")] == ["requests", "responses"]
    assert [g.id for g in served.groups] == ["classify"]  # the composite, from the requests to its answer


def test_serving_graph_refuses_a_graph_without_a_file_reader(tmp_path):
    from beamzoo.core.graph import Graph
    from beamzoo.transforms.sinks import WriteParquet
    from beamzoo.transforms.sources import Files
    g = (Graph.source(Files(str(tmp_path / "*"))) | WriteParquet(str(tmp_path / "o"))).graph
    with pytest.raises(GraphError, match="starts by loading its inputs"):
        serving_ends(g)


def test_engine_answers_rows_and_names_the_step_that_refused_one(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    engine = Engine(Servable.from_model(card).plan, RunContext())
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()
    batch = pa.record_batch([pa.array(["a", "b"]), pa.array(["a", "b"]), pa.array([red, b"not an image"])],
                            schema=pa.schema([("id", pa.string(), False), ("path", pa.string(), False),
                                              ("data", pa.binary())]))
    answer = engine.run(batch)
    rows = answer.by_id("responses", ["label", "score", "topk_labels", "topk_scores", "model"])
    assert rows["a"]["label"] == "red" and rows["a"]["model"] == "tiny_colour:1"
    assert set(rows["a"]) == {"label", "score", "topk_labels", "topk_scores", "model"}
    stage, error = answer.errors()["b"]
    assert stage == "classify/decode" and "not an image" in error


def test_catalog_serves_the_newest_version_by_default(tmp_path):
    path = tiny_colour_model(tmp_path / "tiny.onnx")
    v1, v2 = Servable.from_model(tiny_card(path)), Servable.from_model(tiny_card(path, version="2"))
    cat = Catalog([v2, v1])
    assert cat.versions("tiny_colour") == ["1", "2"]
    assert cat.get("tiny_colour") is v2 and cat.get("tiny_colour", "1") is v1
    with pytest.raises(UnknownServable, match="no version '3'.*served versions: 1, 2"):
        cat.get("tiny_colour", "3")
    with pytest.raises(UnknownServable, match="no model named 'nope'"):
        cat.get("nope")
    with pytest.raises(ValueError, match="given twice"):
        Catalog([v1, v1])
    assert signature(v1.card) == {"inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 3, 32, 32]}],
                                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}]}
    assert list(v1.card.labels) == list(COLOURS)


# ---------------------------------------------------------------- protocols

GOOD = base64.b64encode(b"\xff\xd8\xffsome jpeg").decode()


def test_tf_rows_and_columns_forms():
    assert P.parse_tf({"instances": [{"b64": GOOD}, {"image": {"b64": GOOD}}]}) == \
        ("rows", [b"\xff\xd8\xffsome jpeg"] * 2)
    assert P.parse_tf({"inputs": {"image": [{"b64": GOOD}]}}) == ("columns", [b"\xff\xd8\xffsome jpeg"])
    assert P.parse_tf({"inputs": [{"b64": GOOD}]})[0] == "columns"
    out = P.tf_answer("columns", [{"label": "a", "score": 1.0}, {"error": "bad", "stage": "decode"}],
                      ["label", "score"])
    assert out == {"outputs": {"label": ["a", None], "score": [1.0, None], "error": [None, "bad"]}}


@pytest.mark.parametrize("body, message", [
    ([], "must be a JSON object"),
    ({}, 'needs "instances"'),
    ({"instances": []}, "non-empty list"),
    ({"instances": {"b64": GOOD}}, "non-empty list"),
    ({"instances": [], "inputs": []}, "not both"),
    ({"instances": [{"b64": GOOD}], "extra": 1}, "unknown field"),
    ({"inputs": {"pixels": []}}, 'names the input "image" only'),
])
def test_tf_requests_that_cannot_be_served(body, message):
    with pytest.raises(P.BadRequest, match=message):
        P.parse_tf(body)


@pytest.mark.parametrize("instance, message", [
    ({"b64": "@@@"}, "not valid base64"),
    ({"b64": ""}, "empty"),
    ({"b64": 5}, "must be a string"),
    ("just a string", 'expected {"b64"'),
    ({"img": {"b64": GOOD}}, 'expected {"b64"'),
])
def test_a_bad_instance_is_that_instance_s_error(instance, message):
    form, items = P.parse_tf({"instances": [{"b64": GOOD}, instance]})
    assert items[0] == b"\xff\xd8\xffsome jpeg"
    assert isinstance(items[1], P.Unreadable) and message in items[1] and items[1].startswith("instances[1]")


def test_parse_json_refuses_garbage_and_deep_nesting():
    with pytest.raises(P.BadRequest, match="not valid JSON"):
        P.parse_json(b"{nope")
    with pytest.raises(P.BadRequest, match="not valid JSON"):
        P.parse_json(b"\xff\xfe")
    with pytest.raises(P.BadRequest, match="nested too deeply|not valid JSON"):
        P.parse_json(b"[" * 100_000)


def _v2(**t):
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [GOOD], **t}
    return {"inputs": [tensor]}


@pytest.mark.parametrize("body, message", [
    ({"inputs": []}, "list of one tensor"),
    (_v2(datatype="FP32"), 'datatype "BYTES"'),
    (_v2(shape=[3]), "does not fit 1 data items"),
    ({"inputs": [{"name": "image"}]}, "lacks 'shape', 'datatype', 'data'"),
    ({**_v2(), "outputs": [{"name": "nope"}]}, "unknown output"),
    ({**_v2(), "id": 7}, '"id" must be a string'),
])
def test_v2_requests_that_cannot_be_served(body, message):
    with pytest.raises(P.BadRequest, match=message):
        P.parse_v2(body, ["label", "score"])


def test_v2_outputs_are_typed_tensors():
    schema = pa.schema([("label", pa.string()), ("score", pa.float32()), ("topk_scores", pa.list_(pa.float32()))])
    outs, raw = P.v2_outputs([{"label": "a", "score": 0.5, "topk_scores": [0.5, 0.25]},
                              {"error": "x", "stage": "decode"}], schema, ["label", "score", "topk_scores"])
    assert raw == b""
    assert outs == [
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["a", None]},
        {"name": "score", "datatype": "FP32", "shape": [2], "data": [0.5, None]},
        {"name": "topk_scores", "datatype": "FP32", "shape": [2, 2], "data": [0.5, 0.25, None, None]},
        {"name": "error", "datatype": "BYTES", "shape": [2], "data": [None, "x"]}]


def test_v2_binary_outputs_are_raw_little_endian_after_the_json():
    from beamzoo.serve.tensors import bytes_elements
    schema = pa.schema([("label", pa.string()), ("score", pa.float32()), ("topk_scores", pa.list_(pa.float32()))])
    rows = [{"label": "a", "score": 0.5, "topk_scores": [0.5, 0.25]}, {"error": "x", "stage": "decode"}]
    outs, raw = P.v2_outputs(rows, schema, ["label", "score", "topk_scores"], {"score", "error"})
    assert outs[0] == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["a", None]}  # JSON, as asked
    assert [o.get("parameters") for o in outs] == [None, {"binary_data_size": 8}, None, {"binary_data_size": 9}]
    score = np.frombuffer(raw[:8], "<f4")
    assert score[0] == 0.5 and np.isnan(score[1])  # a failed row has no value
    assert bytes_elements(raw[8:], "error") == [b"", b"x"]


def _binary_v2(images: list[bytes], **tensor):
    from beamzoo.serve.tensors import to_raw
    raw = to_raw("BYTES", images)
    t = {"name": "image", "datatype": "BYTES", "shape": [len(images)], "parameters": {"binary_data_size": len(raw)},
         **tensor}
    return {"inputs": [t]}, raw


def test_v2_binary_inputs_are_length_prefixed_elements():
    jpeg = base64.b64decode(GOOD)
    body, raw = _binary_v2([jpeg, b"", b"\x89PNG"])
    rid, items, names, binary = P.parse_v2(body, ["label", "score"], raw)
    assert items[0] == jpeg and items[2] == b"\x89PNG"
    assert isinstance(items[1], P.Unreadable) and "empty" in items[1]
    assert names == ["label", "score"] and binary == set()
    body["parameters"] = {"binary_data_output": True}
    assert P.parse_v2(body, ["label", "score"], raw)[3] == {"label", "score", "error"}
    body["outputs"] = [{"name": "score", "parameters": {"binary_data": False}}, {"name": "label"}]
    assert P.parse_v2(body, ["label", "score"], raw)[3] == {"label", "error"}  # each output's own wins


@pytest.mark.parametrize("change, message", [
    (lambda b, r: (b, r[:-1]), "binary_data_size 13 must be the 12 bytes"),
    (lambda b, r: ({"inputs": [{**b["inputs"][0], "parameters": {"binary_data_size": 3}}]}, b"\x09\0\0"),
     "end inside an element"),
    (lambda b, r: ({"inputs": [{**b["inputs"][0], "data": ["x"]}]}, r), 'both "data" and binary_data_size'),
    (lambda b, r: ({"inputs": [{**b["inputs"][0], "parameters": {"shm_region": "x"}}]}, r),
     "unknown parameter.*'shm_region'"),
    (lambda b, r: ({**b, "parameters": {"binary_data_output": "yes"}}, r), "must be true or false"),
    (lambda b, r: ({**b, "priority": 1}, r), "unknown field.*'priority'"),
    (lambda b, r: ({"inputs": [{k: v for k, v in b["inputs"][0].items() if k != "parameters"}]}, r),
     "lacks 'data'"),
])
def test_v2_binary_requests_that_cannot_be_served(change, message):
    body, raw = change(*_binary_v2([b"\xff\xd8\xff\xe0" + b"x" * 5]))
    with pytest.raises(P.BadRequest, match=message):
        P.parse_v2(body, ["label", "score"], raw)


def test_a_model_name_field_must_be_the_model_of_the_path():
    body = {**_v2(), "model_name": "lite0"}
    assert P.parse_v2(body, ["label"], model="lite0")[2] == ["label"]
    with pytest.raises(P.BadRequest, match='"lite1" is not the model of the path, .lite0.' ):
        P.parse_v2({**body, "model_name": "lite1"}, ["label"], model="lite0")


def test_the_binary_header_length_must_fit_the_body():
    assert P.split_binary(b'{"a":1}xyz', "7") == (b'{"a":1}', b"xyz")
    assert P.split_binary(b'{"a":1}', None) == (b'{"a":1}', b"")
    for bad in ("99", "-1", "x"):
        with pytest.raises(P.BadRequest, match="Inference-Header-Content-Length"):
            P.split_binary(b'{"a":1}', bad)


def test_the_engine_shares_the_edge_runner_s_onnxruntime_session(tmp_path):
    from beamzoo.transforms.inference import OnnxInference
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    engine = Engine(Servable.from_model(card, max_batch=16).plan, RunContext())
    served = [op for ops in engine.ops.values() for op in ops if isinstance(op, OnnxInference)]
    assert len(served) == 1
    batch_side = OnnxInference(card, batch_size=4)  # as the batch pipeline's Classify makes it
    batch_side.setup()
    assert batch_side._session is served[0]._session


def test_the_engine_runs_a_cascade_s_route_and_merge(tmp_path):
    from beamzoo.cascade import Cascade
    from beamzoo.pipeline import Pipeline
    from beamzoo.transforms.sinks import WriteParquet
    from beamzoo.transforms.sources import Files
    path = tiny_colour_model(tmp_path / "tiny.onnx")
    fast, strong = tiny_card(path), tiny_card(path, name="tiny_strong")
    p = Pipeline()
    p | Files(str(tmp_path / "*.png")) | Cascade(fast, strong, below=0.99, topk=3) | WriteParquet(str(tmp_path / "out"))
    engine = Engine(Servable.of(p.graph, fast).plan, RunContext())
    sure = open(write_colour_image(tmp_path / "sure.png", (230, 20, 20)), "rb").read()
    unsure = open(write_colour_image(tmp_path / "unsure.png", (150, 110, 100)), "rb").read()
    batch = pa.record_batch([pa.array(["s", "u"]), pa.array(["s", "u"]), pa.array([sure, unsure])],
                            schema=pa.schema([("id", pa.string(), False), ("path", pa.string(), False),
                                              ("data", pa.binary())]))
    answer = engine.run(batch)
    assert answer.errors() == {}
    rows = answer.by_id("responses")
    s, u = rows["s"], rows["u"]
    assert (s["label"], s["model"], s["escalation"]) == ("red", "tiny_colour:1", "not_needed")
    assert (u["label"], u["model"], u["escalation"]) == ("red", "tiny_strong:1", "escalated")
    assert u["fast_model"] == "tiny_colour:1" and u["fast_score"] < 0.99

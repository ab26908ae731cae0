"""beamzoo serve's KServe v2 gRPC service over real sockets on 127.0.0.1, talked to with Triton's
own gRPC client at its default settings: the batch pipeline's rows, health and metadata, the HTTP
refusals under their gRPC codes, deadlines and cancelled calls that drop their rows, metrics."""
from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from beamzoo.samples import sample_files
from beamzoo.serve.grpc_service import messages, start_grpc
from beamzoo.serve.models import Servable
from beamzoo.serve.server import Server
from beamzoo.version import __version__
from conftest import tiny_card, tiny_colour_model, write_colour_image
from tests.test_serve_http import close_to, metric

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

FIELDS = ("label", "score", "topk_labels", "topk_scores", "model")
MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_grpc(lite0):
    handle = start_grpc(lite0.server)
    yield handle
    handle.stop(5)


@pytest.fixture(scope="module")
def tiny_grpc(tiny):
    """``tiny`` (versions 1 and 2, a 64 KiB body limit, a queue of 8 rows) over gRPC too."""
    handle = start_grpc(tiny.server)
    handle.images, handle.server = tiny.images, tiny.server
    yield handle
    handle.stop(5)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """The tiny model with a batch due 60 s after its first row came (no answer can come sooner),
    a queue of 4 rows and 100 000 bytes of requests in flight."""
    d = tmp_path_factory.mktemp("slow")
    server = Server([Servable.from_model(tiny_card(tiny_colour_model(d / "tiny.onnx")))],
                    max_batch=8, max_delay_ms=60_000, max_queue=4, max_body_bytes=64 << 10,
                    max_inflight_bytes=100_000, workers=1)
    handle = start_grpc(server)
    handle.server = server
    handle.red = open(write_colour_image(d / "red.png", (230, 20, 20)), "rb").read()
    yield handle
    handle.stop(5)
    server.close()


def client(handle):
    return grpcclient.InferenceServerClient(handle.url)


def images_input(images: list[bytes]):
    i = grpcclient.InferInput("image", [len(images)], "BYTES")
    i.set_data_from_numpy(np.array(images, dtype=object))
    return i


def refused(call) -> tuple[str, str]:
    """(status, message) of the InferenceServerException that ``call()`` raises."""
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


def now(server, name: str, **labels) -> float:
    return metric(server.metrics.text().decode(), name, **labels)


def wait_for(server, name: str, value: float, within: float = 10.0, **labels) -> float:
    """The server's metric once it reads ``value``, or when ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while (v := now(server, name, **labels)) != value and time.monotonic() < deadline:
        time.sleep(0.02)
    return v


def raw_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element's 4-byte little-endian length, then it."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def text(values) -> list[str]:
    return [v.decode() for v in values]


# ---------------------------------------------------------------- the protocol


def test_the_proto_has_the_protocols_names_and_field_numbers():
    """Every message and field of grpc_v2.proto is Triton's (grpc_service.proto), name for number."""
    pb = messages()

    def fields(d):
        return {f.name: (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == 3)
                for f in d.fields}

    def same(ours, theirs, where):
        extra = {"properties", "PropertiesEntry"} if ours.full_name == "inference.ModelMetadataResponse" else ()
        assert {k: v for k, v in fields(ours).items() if k not in extra} == fields(theirs), where  # OIP's addition
        for nested in ours.nested_types:
            if nested.name not in extra:
                same(nested, theirs.nested_types_by_name[nested.name], f"{where}.{nested.name}")

    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert pb.service.full_name == triton.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in pb.service.methods] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                    "ModelMetadata", "ModelInfer"]
    for m in pb.service.methods:
        t = triton.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)
        for d in (m.input_type, m.output_type):
            same(d, service_pb2.DESCRIPTOR.message_types_by_name[d.name], d.name)
    for name in ("InferParameter", "InferTensorContents"):
        same(pb.ModelInferRequest.DESCRIPTOR.file.message_types_by_name[name],
             service_pb2.DESCRIPTOR.message_types_by_name[name], name)


# ---------------------------------------------------------------- answers


@pytest.mark.integration
def test_outputs_are_the_batch_pipeline_rows(lite0_grpc, batch_rows):
    files = sample_files()
    with client(lite0_grpc) as c:
        r = c.infer(MODEL, [images_input([f.read_bytes() for f in files])], request_id="req-9")
    answer = r.get_response()
    assert (answer.model_name, answer.model_version, answer.id) == (MODEL, "1", "req-9")
    assert [o.name for o in answer.outputs] == list(FIELDS)  # none asked for: all, and no error output
    assert len(answer.raw_output_contents) == len(FIELDS)
    cols = {n: r.as_numpy(n) for n in FIELDS}
    assert cols["score"].dtype == np.float32 and cols["topk_scores"].shape == (len(files), 5)
    assert len(files) == len(batch_rows)
    for i, f in enumerate(files):
        row = batch_rows[f.name]
        assert cols["label"][i].decode() == row["label"], f.name
        assert cols["model"][i].decode() == row["model"] == f"{MODEL}:1"
        assert close_to(float(cols["score"][i]), row["score"]), (f.name, cols["score"][i], row["score"])
        assert text(cols["topk_labels"][i]) == row["topk_labels"], f.name
        assert close_to([float(v) for v in cols["topk_scores"][i]], row["topk_scores"]), f.name


@pytest.mark.integration
def test_requested_outputs_only(lite0_grpc, batch_rows):
    files = sample_files()[:3]
    with client(lite0_grpc) as c:
        r = c.infer(MODEL, [images_input([f.read_bytes() for f in files])], model_version="1",
                    outputs=[grpcclient.InferRequestedOutput("topk_labels"), grpcclient.InferRequestedOutput("label")])
    assert [o.name for o in r.get_response().outputs] == ["topk_labels", "label"]
    assert r.as_numpy("score") is None
    assert text(r.as_numpy("label")) == [batch_rows[f.name]["label"] for f in files]
    assert [text(v) for v in r.as_numpy("topk_labels")] == [batch_rows[f.name]["topk_labels"] for f in files]


def test_versions_default_to_the_newest(tiny_grpc):
    red = tiny_grpc.images["red"]
    with client(tiny_grpc) as c:
        newest = c.infer("tiny_colour", [images_input([red])])
        first = c.infer("tiny_colour", [images_input([red])], model_version="1")
    assert newest.get_response().model_version == "2" and text(newest.as_numpy("model")) == ["tiny_colour:2"]
    assert first.get_response().model_version == "1" and text(first.as_numpy("model")) == ["tiny_colour:1"]
    assert text(first.as_numpy("label")) == ["red"]


def test_health_and_metadata(tiny_grpc):
    with client(tiny_grpc) as c:
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("tiny_colour") and c.is_model_ready("tiny_colour", "1")
        assert not c.is_model_ready("nope") and not c.is_model_ready("tiny_colour", "9")  # as Triton answers
        server = c.get_server_metadata(as_json=True)
        assert (server["name"], server["version"]) == ("beamzoo", __version__)
        assert "binary_tensor_data" in server["extensions"]
        assert "model_repository" not in server["extensions"]  # its RPCs are not served over gRPC
        meta = c.get_model_metadata("tiny_colour", as_json=True)
        assert (meta["name"], meta["versions"], meta["platform"]) == ("tiny_colour", ["1", "2"], "beamzoo_onnxruntime")
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("label", "BYTES", ["-1"]), ("score", "FP32", ["-1"]), ("topk_labels", "BYTES", ["-1", "-1"]),
            ("topk_scores", "FP32", ["-1", "-1"]), ("model", "BYTES", ["-1"])]
        assert c.get_model_metadata("tiny_colour", "1").versions == ["1"]
        status, message = refused(lambda: c.get_model_metadata("nope"))
        assert status == "StatusCode.NOT_FOUND" and "no model named 'nope'" in message


def test_unknown_models_and_versions_are_not_found(tiny_grpc):
    with client(tiny_grpc) as c:
        for model, version, says in (("nope", "", "no model named 'nope'"), ("tiny_colour", "9", "no version '9'")):
            status, message = refused(lambda: c.infer(model, [images_input([tiny_grpc.images["red"]])],
                                                      model_version=version))
            assert status == "StatusCode.NOT_FOUND" and says in message, message


def test_one_bad_instance_does_not_fail_the_others(tiny_grpc):
    im = tiny_grpc.images
    with client(tiny_grpc) as c:
        r = c.infer("tiny_colour", [images_input([im["red"], b"this is text, not an image", b"", im["blue"]])])
    assert [o.name for o in r.get_response().outputs] == [*FIELDS, "error"]
    assert text(r.as_numpy("label")) == ["red", "", "", "blue"]
    score = r.as_numpy("score")
    assert np.isnan(score[1]) and np.isnan(score[2]) and score[0] > 0.3
    errors = text(r.as_numpy("error"))
    assert errors[0] == errors[3] == ""
    assert "not an image" in errors[1]
    assert errors[2] == "inputs[0].data[2]: the image is empty (0 bytes)"


def test_every_instance_bad_is_invalid_argument(tiny_grpc):
    with client(tiny_grpc) as c:
        status, message = refused(lambda: c.infer("tiny_colour", [images_input([b"junk", b"more junk"])]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message.startswith("classify/decode: ") and message.endswith("(and 1 more)"), message


def test_images_in_bytes_contents_and_an_n_by_1_shape(tiny_grpc):
    im = tiny_grpc.images
    r = service_pb2.ModelInferRequest(model_name="tiny_colour", id="c1")
    r.inputs.add(name="image", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend([im["green"], im["blue"]])
    r.outputs.add(name="label")
    with grpc.insecure_channel(tiny_grpc.url) as ch:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(r, timeout=30)
    assert answer.id == "c1" and [o.name for o in answer.outputs] == ["label"]
    assert list(answer.outputs[0].shape) == [2]
    assert answer.raw_output_contents[0] == raw_bytes([b"green", b"blue"])


def _shape(r, shape):
    del r.inputs[0].shape[:]
    r.inputs[0].shape.extend(shape)


@pytest.mark.parametrize("change, code, says", [
    (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "INVALID_ARGUMENT", "must have datatype \"BYTES\""),
    (lambda r: setattr(r.inputs[0], "name", "pixels"), "INVALID_ARGUMENT", "the input is named \"image\""),
    (lambda r: _shape(r, [3]), "INVALID_ARGUMENT", "shape [3] does not fit 2 data items (expected [2])"),
    (lambda r: (r.inputs.add(name="image", datatype="BYTES", shape=[1]), r.raw_input_contents.append(b"")),
     "INVALID_ARGUMENT", '"inputs" must be a list of one tensor'),
    (lambda r: r.raw_input_contents.append(b""), "INVALID_ARGUMENT", "raw_input_contents has 2 entries for 1 input"),
    (lambda r: setattr(r.parameters["priority"], "uint64_param", 1), "INVALID_ARGUMENT",
     "unknown parameter(s) 'priority'"),
    (lambda r: r.outputs.add(name="nope"), "INVALID_ARGUMENT", "unknown output(s) 'nope'; outputs: label, score"),
    (lambda r: r.raw_input_contents.__setitem__(0, b"\x05\x00\x00\x00ab"), "INVALID_ARGUMENT",
     "an element says 5 bytes, but only 2 are left"),
    (lambda r: r.raw_input_contents.pop(), "INVALID_ARGUMENT", "has no data"),
    (lambda r: r.inputs[0].contents.bytes_contents.append(b"x"), "INVALID_ARGUMENT",
     "has both contents and raw_input_contents"),
    (lambda r: (_shape(r, [9]), r.raw_input_contents.__setitem__(0, raw_bytes([b"x"] * 9))), "RESOURCE_EXHAUSTED",
     "the request has 9 instances; this server takes at most 8 in one request (--max_queue)"),
], ids=["datatype", "name", "shape", "two-inputs", "raw-count", "parameter", "output", "raw-broken", "no-data",
        "both-contents", "over-max-queue"])
def test_bad_requests_get_their_code_and_the_server_stays_up(tiny_grpc, change, code, says):
    im = tiny_grpc.images
    r = service_pb2.ModelInferRequest(model_name="tiny_colour")
    r.inputs.add(name="image", datatype="BYTES", shape=[2])
    r.raw_input_contents.append(raw_bytes([im["red"], im["blue"]]))
    change(r)
    with grpc.insecure_channel(tiny_grpc.url) as ch:
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(r, timeout=30)
    assert e.value.code() == getattr(grpc.StatusCode, code) and says in e.value.details(), e.value.details()
    with client(tiny_grpc) as c:  # still serving
        assert text(c.infer("tiny_colour", [images_input([im["green"]])]).as_numpy("label")) == ["green"]


def test_a_message_over_max_body_bytes_is_resource_exhausted(tiny_grpc):
    with client(tiny_grpc) as c:
        status, message = refused(lambda: c.infer("tiny_colour", [images_input([b"\0" * (100 << 10)])]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in message, message
        assert text(c.infer("tiny_colour", [images_input([tiny_grpc.images["red"]])]).as_numpy("label")) == ["red"]


def test_metrics_count_grpc_requests_by_outcome(tiny_grpc):
    server, im = tiny_grpc.server, tiny_grpc.images
    before = server.metrics.text().decode()
    with client(tiny_grpc) as c:
        c.infer("tiny_colour", [images_input([im["red"]])])
        c.infer("tiny_colour", [images_input([im["red"], b"junk"])])
        refused(lambda: c.infer("nope", [images_input([im["red"]])]))
        refused(lambda: c.infer("tiny_colour", [images_input([b"junk"])]))
        refused(lambda: c.infer("tiny_colour", [images_input([im["red"]] * 9)]))
    after = server.metrics.text().decode()

    def grew(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    for outcome in ("ok", "partial", "not_found", "bad_request", "too_large"):
        assert grew("beamzoo_requests_total", protocol="grpc", outcome=outcome) == 1, outcome
    assert grew("beamzoo_requests_total", model="tiny_colour", version="2", protocol="grpc", outcome="ok") == 1
    assert grew("beamzoo_requests_total", model="nope", protocol="grpc", outcome="not_found") == 1
    assert grew("beamzoo_request_seconds_count", model="tiny_colour", protocol="grpc") == 4
    assert grew("beamzoo_requests_total", protocol="v2") == grew("beamzoo_requests_total", protocol="tf") == 0
    assert grew("beamzoo_dead_letters_total", model="tiny_colour", stage="classify/decode") == 2
    assert now(server, "beamzoo_inflight_bytes") == 0  # every request's bytes given back


def test_stop_and_a_port_taken(tiny_grpc):
    second = start_grpc(tiny_grpc.server)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{second.port} for gRPC"):
        start_grpc(tiny_grpc.server, port=second.port)
    with client(second) as c:
        assert c.is_server_live()
        second.stop(0)
        status, _ = refused(c.is_server_live)
    assert status == "StatusCode.UNAVAILABLE"


# ---------------------------------------------------------------- a full queue, deadlines, cancelled calls


def test_a_full_queue_is_resource_exhausted_and_a_cancelled_call_drops_its_rows(slow):
    server = slow.server
    dropped = now(server, "beamzoo_cancelled_rows_total")
    ended = threading.Event()
    got = {}

    def done(result, error):
        got["error"] = error
        ended.set()

    with client(slow) as c:
        call = c.async_infer("tiny_colour", [images_input([slow.red] * 4)], done)  # the queue is full
        assert wait_for(server, "beamzoo_queue_rows", 4) == 4
        status, message = refused(lambda: c.infer("tiny_colour", [images_input([slow.red])]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED", status
        assert message.startswith("the server is busy: the queue holds 4 of at most 4 rows"), message
        call.cancel()
        assert ended.wait(10) and got["error"].status() == "StatusCode.CANCELLED"
    assert wait_for(server, "beamzoo_cancelled_rows_total", dropped + 4) == dropped + 4
    assert now(server, "beamzoo_queue_rows") == 0
    assert wait_for(server, "beamzoo_requests_total", 1, protocol="grpc", outcome="disconnected") == 1
    assert now(server, "beamzoo_requests_total", protocol="grpc", outcome="queue_full") == 1


def test_bytes_in_flight_past_the_cap_are_resource_exhausted(slow):
    server = slow.server
    ended = threading.Event()
    with client(slow) as c:
        call = c.async_infer("tiny_colour", [images_input([b"\0" * 60_000])], lambda result, error: ended.set())
        assert wait_for(server, "beamzoo_queue_rows", 1) == 1
        held = now(server, "beamzoo_inflight_bytes")
        assert 60_000 < held < 61_000  # the request's message, while it waits
        status, message = refused(lambda: c.infer("tiny_colour", [images_input([b"\0" * 50_000])]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and "(--max_inflight_bytes)" in message, message
        assert now(server, "beamzoo_inflight_bytes") == held  # the refused one gave its share back
        call.cancel()
        assert ended.wait(10)
    assert wait_for(server, "beamzoo_inflight_bytes", 0) == 0
    assert wait_for(server, "beamzoo_queue_rows", 0) == 0
    assert now(server, "beamzoo_requests_total", protocol="grpc", outcome="busy") == 1


def test_a_client_deadline_before_the_answer_is_deadline_exceeded(slow):
    server = slow.server
    dropped, timeouts = now(server, "beamzoo_cancelled_rows_total"), now(server, "beamzoo_requests_total",
                                                                       outcome="timeout")
    with client(slow) as c:
        status, _ = refused(lambda: c.infer("tiny_colour", [images_input([slow.red])], client_timeout=0.5))
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    assert wait_for(server, "beamzoo_cancelled_rows_total", dropped + 1) == dropped + 1  # its row is not run
    assert wait_for(server, "beamzoo_requests_total", timeouts + 1, protocol="grpc", outcome="timeout") == timeouts + 1
    assert now(server, "beamzoo_queue_rows") == 0


def test_the_servers_time_budget_is_deadline_exceeded_with_its_message(slow):
    server = slow.server
    server.timeout_s = 0.3
    try:
        with client(slow) as c:
            status, message = refused(lambda: c.infer("tiny_colour", [images_input([slow.red])]))
    finally:
        server.timeout_s = 60.0
    assert (status, message) == ("StatusCode.DEADLINE_EXCEEDED", "no answer within 0.3 s")
    assert wait_for(server, "beamzoo_queue_rows", 0) == 0
    assert now(server, "beamzoo_batch_rows_count") == 0  # no row of these tests was run

"""beamzoo serve answers clients written elsewhere: tritonclient's HTTP client with its default
settings (binary tensors) and the KServe Python SDK's REST client, each sending the sample
photographs, get the batch pipeline's rows (labels equal, scores within 1e-5)."""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from beamzoo.samples import sample_files
from tests.clients_venv import IndexUnreachable, REQUIREMENTS, ensure

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet_lite0"
FIELDS = ("label", "score", "topk_labels", "topk_scores", "model")
TOL = 1e-5


def triton(running):
    return httpclient.InferenceServerClient(running.url.removeprefix("http://"))


def image_input(images: list, binary_data: bool = True):
    i = httpclient.InferInput("image", [len(images)], "BYTES")
    return i.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary_data)


def text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def assert_batch_rows(names: list[str], cols: dict, rows: dict) -> None:
    """``cols``: output name -> one value per image (a list per image for the top k); ``rows``: the
    batch pipeline's, by file name."""
    for i, name in enumerate(names):
        row = rows[name]
        if "label" in cols:
            assert text(cols["label"][i]) == row["label"], name
        if "model" in cols:
            assert text(cols["model"][i]) == row["model"], name
        if "score" in cols:
            assert abs(float(cols["score"][i]) - row["score"]) <= TOL, (name, cols["score"][i], row["score"])
        if "topk_labels" in cols:
            assert [text(v) for v in cols["topk_labels"][i]] == row["topk_labels"], name
        if "topk_scores" in cols:
            assert np.allclose(np.asarray(cols["topk_scores"][i], float), row["topk_scores"], rtol=0, atol=TOL), name


@pytest.mark.integration
def test_tritonclient_defaults_send_and_get_binary_tensors_with_the_batch_rows(lite0, batch_rows):
    files = sample_files()
    with triton(lite0) as c:
        res = c.infer(MODEL, [image_input([f.read_bytes() for f in files])])
    outputs = res.get_response()["outputs"]
    assert [o["name"] for o in outputs] == list(FIELDS)  # no outputs named: all of them, as binary data
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in outputs), outputs
    cols = {n: res.as_numpy(n) for n in FIELDS}
    assert cols["topk_scores"].shape == (len(files), 5) and cols["score"].dtype == np.float32
    assert_batch_rows([f.name for f in files], cols, batch_rows)


@pytest.mark.integration
def test_tritonclient_requested_outputs_binary_and_json(lite0, batch_rows):
    files = sample_files()[:4]
    images = [f.read_bytes() for f in files]
    with triton(lite0) as c:
        binary = c.infer(MODEL, [image_input(images)], outputs=[httpclient.InferRequestedOutput("label"),
                                                                 httpclient.InferRequestedOutput("topk_scores")],
                         model_version="1", request_id="req-3")
        plain = c.infer(MODEL, [image_input(images)],
                        outputs=[httpclient.InferRequestedOutput(n, binary_data=False) for n in FIELDS])
    answer = binary.get_response()
    assert (answer["id"], answer["model_version"]) == ("req-3", "1")
    assert [o["name"] for o in answer["outputs"]] == ["label", "topk_scores"]
    assert all("binary_data_size" in o["parameters"] for o in answer["outputs"])
    assert binary.as_numpy("score") is None  # not asked for, not sent
    assert_batch_rows([f.name for f in files], {n: binary.as_numpy(n) for n in ("label", "topk_scores")}, batch_rows)
    assert all("data" in o for o in plain.get_response()["outputs"])
    assert_batch_rows([f.name for f in files], {n: plain.as_numpy(n) for n in FIELDS}, batch_rows)


@pytest.mark.integration
def test_tritonclient_health_and_metadata_calls(lite0):
    with triton(lite0) as c:
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
        assert not c.is_model_ready("nope") and not c.is_model_ready(MODEL, "9")
        assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
        meta = c.get_model_metadata(MODEL)
        assert meta["versions"] == ["1"] and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
            ("label", "BYTES"), ("score", "FP32"), ("topk_labels", "BYTES"), ("topk_scores", "FP32"),
            ("model", "BYTES")]
        with pytest.raises(InferenceServerException, match="no model named 'nope'"):
            c.get_model_metadata("nope")


@pytest.mark.integration
def test_tritonclient_reads_a_bad_instance_error_from_the_error_output(lite0, batch_rows):
    good = sample_files()[:2]
    images = [good[0].read_bytes(), b"this is text, not an image", b"", good[1].read_bytes()]
    with triton(lite0) as c:
        res = c.infer(MODEL, [image_input(images)])
    errors = [text(e) for e in res.as_numpy("error")]
    assert errors[0] == errors[3] == ""
    assert "not an image" in errors[1] and "the image is empty (0 bytes)" in errors[2], errors
    labels, scores = res.as_numpy("label"), res.as_numpy("score")
    assert labels[1] == labels[2] == b"" and np.isnan(scores[1]) and np.isnan(scores[2])
    assert_batch_rows([good[0].name, good[1].name], {"label": labels[[0, 3]], "score": scores[[0, 3]],
                                                    "topk_labels": res.as_numpy("topk_labels")[[0, 3]]}, batch_rows)


@pytest.mark.integration
def test_tritonclient_json_inputs(lite0, batch_rows):
    """``binary_data=False``: tritonclient puts each element in the JSON as a UTF-8 string. An
    image is not UTF-8, so it refuses to send one; base64 text is what beamzoo reads there."""
    files = sample_files()[:3]
    with triton(lite0) as c:
        with pytest.raises(InferenceServerException, match="Failed to encode"):  # nothing is sent
            image_input([f.read_bytes() for f in files], binary_data=False)
        res = c.infer(MODEL, [image_input([base64.b64encode(f.read_bytes()).decode() for f in files], False)])
        assert_batch_rows([f.name for f in files], {n: res.as_numpy(n) for n in FIELDS}, batch_rows)


@pytest.mark.integration
@pytest.mark.parametrize("images, binary_data, message", [
    (["a photo of a cat"], False, "not valid base64"),  # raw text, as tritonclient sends a str
    ([b"\xff\xd8 not a jpeg"], True, "not an image"),
])
def test_tritonclient_gets_a_clear_400_when_no_instance_can_be_read(lite0, images, binary_data, message):
    """The answer to a failed request is JSON alone: tritonclient reads an error's whole body as JSON."""
    with triton(lite0) as c:
        with pytest.raises(InferenceServerException) as err:
            c.infer(MODEL, [image_input(images, binary_data)])
        assert err.value.status() == "400" and message in err.value.message(), err.value.message()
        assert c.is_server_ready()  # still serving


@pytest.fixture(scope="module")
def kserve_python():
    """The clients venv's python, made on first use (about half a minute with a warm pip cache)."""
    try:
        python, seconds = ensure()
    except IndexUnreachable as exc:
        pytest.skip(str(exc))
    if seconds is not None:
        print(f"made the clients venv ({REQUIREMENTS}) in {seconds:.0f} s")
    return python


@pytest.mark.slow
@pytest.mark.integration
def test_the_kserve_sdk_rest_client_gets_the_batch_rows(kserve_python, lite0, batch_rows):
    files = sample_files()
    done = subprocess.run([str(kserve_python), str(ROOT / "tests" / "kserve_rest_client.py"), lite0.url, MODEL,
                           *map(str, files)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert (got["live"], got["ready"], got["model_ready"], got["unknown_model_ready"]) == (True, True, True, False)
    names = [f.name for f in files]
    for form, binary_in in (("binary", True), ("binary_out", True), ("json", False)):
        answer = got[form]
        assert answer["status"] == 200, (form, answer.get("error"), answer["sent"])
        assert answer["binary"] is binary_in and answer["id"] == form, form
        cols = answer["outputs"]
        k = answer["shapes"]["topk_scores"][1]
        cols = {**cols, "topk_labels": [cols["topk_labels"][i * k:(i + 1) * k] for i in range(len(names))],
                "topk_scores": [cols["topk_scores"][i * k:(i + 1) * k] for i in range(len(names))]}
        assert_batch_rows(names, cols, batch_rows)
    errors = got["binary_out"]["outputs"]["error"]
    assert errors[:-1] == [""] * len(names) and "not an image" in errors[-1], errors
    assert "error" not in got["binary"]["outputs"]

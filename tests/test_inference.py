"""ONNX inference: the model's real signature is checked against its card at load."""
from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
from onnx import TensorProto

from beamzoo.core.schemas import tensor_array
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.postprocess import TopK, softmax
from beamzoo.zoo import CardError, ModelIntegrityError, get
from conftest import tiny_card, tiny_colour_model


def pixels_batch(x: np.ndarray, card) -> pa.RecordBatch:
    paths = pa.array([f"p{i}" for i in range(len(x))], pa.string())
    schema = pa.schema([pa.field("id", pa.string()), pa.field("path", pa.string()), card.input.field("pixels")])
    return pa.record_batch([paths, paths, tensor_array(x)], schema=schema)


def colour_pixels(n):
    x = np.full((n, 3, 32, 32), -1.0, np.float32)
    for i in range(n):
        x[i, i % 3] = 1.0  # channel i%3 bright
    return x


def test_inference_and_topk_on_a_tiny_model(tiny_model):
    infer, topk = OnnxInference(tiny_model, batch_size=4), TopK(tiny_model, k=2)
    rows, dead = infer.process(pixels_batch(colour_pixels(10), tiny_model))
    assert dead.num_rows == 0 and rows.schema.names == ["id", "path", "logits"]
    assert rows.column("logits").to_numpy_ndarray().shape == (10, 3)
    out, _ = topk.process(rows)
    assert out.column("label").to_pylist() == [("red", "green", "blue")[i % 3] for i in range(10)]
    scores = out.column("topk_scores").to_pylist()
    assert all(s[0] >= s[1] for s in scores)
    assert out.column("model").to_pylist() == ["tiny_colour:1"] * 10


def test_empty_batch_gives_empty_output(tiny_model):
    rows, dead = OnnxInference(tiny_model).process(pixels_batch(colour_pixels(0), tiny_model))
    assert rows.num_rows == 0 and dead.num_rows == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_name="input"), "'inputs[0].name': does not fit the ONNX file: 'images' is not in the model; "
                               "its inputs: 'input'"),
    (dict(dtype=TensorProto.UINT8), "'inputs[0].dtype': does not fit the ONNX file: 'images' is uint8 in the "
                                    "model, the card says float32"),
    (dict(size=64), "'inputs[0].shape': does not fit the ONNX file: 'images' is ['batch', 3, 64, 64] in the "
                    "model, the card says [3, 32, 32]"),
])
def test_model_that_differs_from_its_card_is_refused_at_load(tmp_path, kwargs, message):
    size = kwargs.pop("size", 32)
    path = tiny_colour_model(tmp_path / "m.onnx", size=size, **kwargs)
    infer = OnnxInference(tiny_card(path))  # the card still declares 'images' float32 [3, 32, 32]
    with pytest.raises(CardError) as err:
        infer.setup()
    assert message in str(err.value) and "model card tiny_colour:1 field" in str(err.value)


def test_model_file_with_wrong_sha256_is_refused(tmp_path):
    path = tiny_colour_model(tmp_path / "m.onnx")
    card = tiny_card(path, sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="has sha256 .* but its card pins 0000"):
        OnnxInference(card).setup()


def test_a_failing_batch_is_retried_row_by_row(tiny_model):
    class FailsOnNaN(OnnxInference):
        def run(self, x):
            if np.isnan(x["images"]).any():
                raise RuntimeError("NaN input")
            return super().run(x)

    x = colour_pixels(6)
    x[4, 0, 0, 0] = np.nan
    rows, dead = FailsOnNaN(tiny_model, batch_size=6).process(pixels_batch(x, tiny_model))
    assert rows.column("path").to_pylist() == ["p0", "p1", "p2", "p3", "p5"]
    assert dead.to_pylist() == [{"id": "p4", "source": "p4", "stage": "infer", "error": "RuntimeError: NaN input",
                                 "key": None, "parent_id": None}]


def test_operator_pickles_without_its_session(tiny_model):
    infer = OnnxInference(tiny_model)
    infer.setup()
    clone = pickle.loads(pickle.dumps(infer))
    assert clone._session is None
    assert clone.process(pixels_batch(colour_pixels(3), tiny_model)).ok.num_rows == 3


def test_knobs_are_validated(tiny_model):
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxInference(tiny_model, optimization="fast")
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        TopK(tiny_model, k=4)


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    assert np.allclose(p, [[0.5, 0.5, 0.0]])


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(KeyError, match="no model named 'resnet9000'.*efficientnet_lite0"):
        get("resnet9000")

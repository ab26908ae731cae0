"""Shared fixtures: tiny ONNX models built with onnx.helper, and image files."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request


import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beamzoo.core.schemas import TensorSpec
from beamzoo.zoo import ModelCard, card_from_dict, sha256_of

COLOURS = ("red", "green", "blue")


def tiny_colour_model(path, size=32, dtype=TensorProto.FLOAT, input_name="images"):
    """[N,3,size,size] -> logits [N,3]: the mean of each channel.

    An image that is mostly red gets the label "red", and so on.
    """
    x = helper.make_tensor_value_info(input_name, dtype, ["N", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    scale = numpy_helper.from_array(np.array(10.0, np.float32), "scale")
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "scale"], ["logits"]),
    ]
    if dtype != TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Cast", [input_name], ["xf"], to=TensorProto.FLOAT))
        nodes[1].input[0] = "xf"
    graph = helper.make_graph(nodes, "tiny", [x], [y], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_card(path, size=32, **kw) -> ModelCard:
    """The card of ``tiny_colour_model``, as a graph holds it (its file checked when it loads)."""
    d = dict(name="tiny_colour", version="1", task="image-classification", file=str(path),
             sha256=sha256_of(path),
             inputs=[dict(name="images", dtype="float32", shape=[3, size, size], layout="NCHW",
                          channels="RGB", value_range=[-1, 1])],
             outputs=[dict(name="logits", dtype="float32", shape=[3])],
             labels=list(COLOURS), preprocess=dict(resize=size + size // 7, crop=size))
    d.update(kw)
    return card_from_dict(d, f"tiny card for {path}", base=None)


@pytest.fixture
def tiny_model(tmp_path):
    return tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))


def write_colour_image(path, rgb, size=(48, 40)):
    """A solid-colour image; ``size`` is (width, height)."""
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = rgb[::-1]  # OpenCV writes BGR
    ok, data = cv2.imencode(os.path.splitext(str(path))[1], img)
    assert ok
    with open(path, "wb") as f:
        f.write(data.tobytes())
    return str(path)


@pytest.fixture
def colour_dir(tmp_path):
    """Nine real image files of solid red, green or blue, in jpg and png."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    rgbs = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    for i in range(9):
        name = COLOURS[i % 3]
        ext = "jpg" if i % 2 else "png"
        folder = d / "sub" if i >= 6 else d
        write_colour_image(folder / f"{name}{i}.{ext}", rgbs[name])
    return d


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


def debian_tool(name: str) -> str:
    """The path of ``name`` (redis-server, chromium); on a fresh machine the project's own
    ``.ci/install-<tool>`` installs the Debian package first; skips where it cannot."""
    found = shutil.which(name)
    if found is None:
        script = os.path.join(ROOT, ".ci", f"install-{name.removesuffix('-server')}")
        got = subprocess.run([script], capture_output=True, text=True)
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is missing and {os.path.relpath(script, ROOT)} could not install it: "
                        f"{got.stderr.strip()[-300:]}")
    return found


def free_ports(n: int) -> list[int]:
    """n ports free now on 127.0.0.1 (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def flink_cluster():
    """A local standalone Flink cluster (JobManager, TaskManager, Beam worker pool);
    afterwards, nothing it started may be left running or listening."""
    from beamzoo.runners import flink
    rest, worker, rpc = free_ports(3)  # not Flink's defaults: a user's own cluster may hold those
    info = flink.cluster_up(parallelism=2, rest_port=rest, worker_port=worker, rpc_port=rpc)
    info["ports"] = (rest, rpc, worker)
    pids = {p for ps in info["pids"].values() for p in ps}
    assert len(pids) == 3, info
    info["seen_worker_pids"] = set()
    yield info
    pids |= set(flink.taskmanager_pids())
    flink.cluster_down()
    left = [p for p in pids | info["seen_worker_pids"] if _alive(p)]
    assert not left, f"processes left alive after cluster_down: {left}"
    busy = [p for p in info["ports"] if _listening(p)]
    assert not busy, f"ports still listening after cluster_down: {busy}"


def flink_rest(path: str) -> dict:
    from beamzoo.runners import flink
    with urllib.request.urlopen(f"http://{flink.cluster_status()['rest']}{path}", timeout=10) as r:
        return json.load(r)


def subtask_reads(vertex_name: str) -> list[int]:
    """Records read by each subtask of the latest job's first vertex whose name
    contains ``vertex_name``, from Flink's REST API."""
    job = max(flink_rest("/jobs/overview")["jobs"], key=lambda j: j["start-time"])
    assert job["state"] == "FINISHED", job
    vertices = flink_rest(f"/jobs/{job['jid']}")["vertices"]
    named = [v for v in vertices if vertex_name in v["name"]]
    assert named, f"no vertex named like {vertex_name!r}: {[v['name'] for v in vertices]}"
    vertex = named[0]
    subtasks = flink_rest(f"/jobs/{job['jid']}/vertices/{vertex['id']}")["subtasks"]
    return [s["metrics"]["read-records"] for s in subtasks]


# ---------------------------------------------------------------- running graphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = ["EdgeRunner", "DirectRunner"]
FLINK = pytest.param("FlinkRunner", marks=[pytest.mark.flink, pytest.mark.slow])


def read(directory, sub: str = "predictions") -> list[dict]:
    """The rows of the Parquet files in ``directory/sub``, sorted by id."""
    import pyarrow.parquet as pq
    folder = os.path.join(str(directory), sub)
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")]
    assert files, f"no Parquet files in {folder}"
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["id"])


def assert_same_rows(a: list[dict], b: list[dict], tol=1e-5):
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        for name, value in x.items():
            if isinstance(value, float):
                assert abs(value - y[name]) <= tol, (x["id"], name)
            elif isinstance(value, list) and value and isinstance(value[0], float):
                assert all(abs(p - q) <= tol for p, q in zip(value, y[name])), (x["id"], name)
            else:
                assert value == y[name], (x["id"], name)


def run_graph(graph, runner: str = "EdgeRunner", **kw):
    """Run a graph as the tests do: a small edge runner, no progress bar."""
    from beamzoo.pipeline import run
    from beamzoo.runners.edge import EdgeRunner
    kw.setdefault("edge", EdgeRunner(workers=2, chunk_size=3, progress=False))
    return run(graph, runner, **kw)


@pytest.fixture(params=RUNNERS)
def runner(request):
    """Each behaviour test runs on the edge runner and on DirectRunner."""
    return request.param


@pytest.fixture(params=[*RUNNERS, FLINK])
def any_runner(request):
    """The same, and on embedded Flink (marked flink and slow)."""
    return request.param


def paths_batch(paths: list[str]):
    """The first batch of a file graph: ``id`` and ``path``."""
    from beamzoo.transforms.sources import Files
    return Files("x").to_batch(list(paths)).ok


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a command's mistake; besides it, at most a hint to --help (and
    the warnings libraries log when they are imported, Beam's missing-apitools one)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING:")]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    rest = [line for line in lines if line not in errors]
    assert len(rest) <= 1 and all("--help" in line for line in rest), stderr[-3000:]
    return errors[0]


# The serving tests' servers and the batch rows they are compared with (tests/test_serve_*.py).

@pytest.fixture(scope="session")
def batch_rows(tmp_path_factory):
    """The batch pipeline's rows for the sample photographs, by file name."""
    from beamzoo.pipeline import score_images
    from beamzoo.samples import make_sample_set
    d = tmp_path_factory.mktemp("batch")
    images = make_sample_set(d / "images")
    run_graph(score_images(str(images), str(d / "out")))
    return {os.path.basename(r["path"]): r for r in read(d / "out")}


@pytest.fixture(scope="module")
def lite0():
    """efficientnet_lite0 served over HTTP on a free port."""
    from beamzoo.serve.models import Servable
    from beamzoo.serve.server import Server
    running = Server([Servable.from_model("efficientnet_lite0")], max_batch=8, max_delay_ms=5, workers=2).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny colour model in versions 1 and 2, a 64 KiB body limit, a queue of 8 rows."""
    from beamzoo.serve.models import Servable
    from beamzoo.serve.server import Server
    d = tmp_path_factory.mktemp("tiny")
    path = tiny_colour_model(d / "tiny.onnx")
    servables = [Servable.from_model(tiny_card(path)), Servable.from_model(tiny_card(path, version="2"))]
    running = Server(servables, max_batch=4, max_delay_ms=2, max_queue=8, max_body_bytes=64 << 10,
                     workers=1).start()
    running.images = {c: open(write_colour_image(d / f"{c}.png", rgb), "rb").read()
                      for c, rgb in (("red", (230, 20, 20)), ("green", (20, 230, 20)), ("blue", (20, 20, 230)))}
    yield running
    running.stop()

"""Every Python and command-line example of README.md and docs/ runs as written.

Each page's blocks run in order, in one folder of its own that holds ``photos/``
(the sample JPEGs, some in ``photos/album/``), ``scans/`` (two pages of text) and
``pipelines/`` (a link to the repository's). The only changes to a block are
paths and hosts: a port of 127.0.0.1 or localhost (or given with --port, --grpc_port) becomes a free one, ``0.0.0.0``
becomes 127.0.0.1, the remote tier's hosts become servers this test starts, a
Redis URL one of a ``redis-server`` this test starts, and ``~/models`` and
``/srv/models`` a model repository in the page's folder. A block marked
``<!-- docs: skip (reason) -->`` right before its fence is not run; the reason
must be given. Blocks in other fences (text, yaml, json) are not code to run.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from beamzoo.samples import sample_files
from conftest import ROOT, free_ports, read

PAGES = [Path(ROOT) / "README.md"] + sorted((Path(ROOT) / "docs").rglob("*.md"))
RUNNABLE = {"python", "bash", "sh"}
INERT = {"text", "yaml", "json"}
SKIP = re.compile(r"<!-- docs: skip \((?P<reason>[^)]{10,})\) -->")
SUMMARY = re.compile(r"inputs: (\d+)  scored: (\d+)  dead letters: (\d+)(?:  already done: (\d+))?")
LOCAL_PORT = re.compile(r"\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d{2,5})\b|--(?:grpc_)?port (\d{2,5})\b")
REMOTE_HOST = re.compile(r"http://(cloud-[a-z]+:\d+)")
BACKGROUND = re.compile(r"&\s*(#.*)?$")  # a command line left running in the background


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the reason given, for a block that is not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i
            end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
            marker = SKIP.fullmatch(lines[i - 1].strip()) if i else None
            found.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n",
                               marker["reason"] if marker else None))
            i = end
        i += 1
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- the structure of the pages -------------------------------------------------------------------

def test_every_block_says_what_it_is_and_every_skip_why():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for b in blocks(page):
            assert b.lang in RUNNABLE | INERT, f"{b.where}: fence ```{b.lang}: use python, bash, text, yaml or json"
            assert b.skip is None or b.lang in RUNNABLE, f"{b.where}: a skip marker before a block that never runs"
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip().startswith("<!-- docs:"):
                assert SKIP.fullmatch(line.strip()), f"{page_id(page)}:{n}: write <!-- docs: skip (the reason) -->"
                assert text.splitlines()[n].startswith("```"), f"{page_id(page)}:{n}: a marker right before a fence"
    skipped = [b.where for p in PAGES for b in blocks(p) if b.skip]
    assert len(skipped) <= 4, f"few blocks may be skipped: {skipped}"


def test_the_readme_is_a_front_page():
    text = (Path(ROOT) / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && '
            "python pipelines/score_images.py --output out/") in text
    assert "```bash\npython -m pytest\n```" in text
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (Path(ROOT) / page).is_file(), page


def test_the_docs_show_classify_beam_py_as_it_is():
    text = (Path(ROOT) / "docs" / "pipelines.md").read_text(encoding="utf-8")
    shown = text.split("`pipelines/classify_beam.py`, in full:\n\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert shown == (Path(ROOT) / "pipelines" / "classify_beam.py").read_text(encoding="utf-8")


def test_the_card_shown_is_a_card(tmp_path):
    from beamzoo.zoo import load_card
    card = load_card(write_example_card(tmp_path))
    assert (card.name, card.version, tuple(card.labels)) == ("cat_or_not", "2", ("cat", "not_cat"))


MKDOCS = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")


@pytest.mark.skipif(MKDOCS is None, reason="mkdocs is not installed (the dev extra has it)")
def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([MKDOCS, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "serving" / "index.html").is_file()


# --- the example card, made real: the same YAML, a tiny model of its signature ---------------------

def example_card_yaml() -> str:
    zoo_page = Path(ROOT) / "docs" / "zoo.md"
    [card] = [b.code for b in blocks(zoo_page) if b.lang == "yaml" and "name: cat_or_not" in b.code]
    return card


def write_example_card(folder: Path, card_name: str = "card.yaml") -> Path:
    """The docs' card in ``folder``, with a model of its signature: [N,3,224,224] -> two logits
    (channel means weighted). Only the placeholder sha256 is filled in."""
    folder.mkdir(parents=True, exist_ok=True)
    d = yaml.safe_load(example_card_yaml())
    [inp], [out] = d["inputs"], d["outputs"]
    x = helper.make_tensor_value_info(inp["name"], TensorProto.FLOAT, ["N", *inp["shape"]])
    y = helper.make_tensor_value_info(out["name"], TensorProto.FLOAT, ["N", *out["shape"]])
    w = numpy_helper.from_array(np.array([[3.0, -3.0], [-1.0, 1.0], [0.5, -0.5]], np.float32), "w")
    graph = helper.make_graph([helper.make_node("ReduceMean", [inp["name"]], ["m"], axes=[2, 3], keepdims=0),
                               helper.make_node("MatMul", ["m", "w"], [out["name"]])], "cat_or_not", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / d["file"]))
    sha = hashlib.sha256((folder / d["file"]).read_bytes()).hexdigest()
    text = re.sub(r"(?m)^sha256: \S+", f"sha256: {sha}", example_card_yaml(), count=1)
    (folder / card_name).write_text(text)
    return folder / card_name


# --- a page's folder, its servers, and running its blocks ------------------------------------------

class Workspace:
    def __init__(self, root: Path, page: Path):
        self.root, self.page = root, page
        self.subs: list[tuple[str, str]] = []
        self.background: list[int] = []  # process groups of blocks that left servers running
        self.servers: list = []
        self.redis: subprocess.Popen | None = None
        jpgs = [p for p in sample_files() if p.suffix == ".jpg"]
        (root / "photos" / "album").mkdir(parents=True)
        for p in jpgs:
            shutil.copyfile(p, root / "photos" / p.name)
            shutil.copyfile(p, root / "photos" / "album" / p.name)
        import skimage.data
        (root / "scans").mkdir()
        for name in ("page.png", "text.png"):
            shutil.copyfile(Path(skimage.data.__file__).parent / name, root / "scans" / name)
        (root / "pipelines").symlink_to(Path(ROOT) / "pipelines")
        text = page.read_text(encoding="utf-8")
        if "my/cards/cat.yaml" in text or "~/models" in text or "/srv/models" in text:
            write_example_card(root / "my" / "cards", "cat.yaml")
            write_example_card(root / "models" / "cat_or_not" / "2")
            self.subs += [("~/models", str(root / "models")), ("/srv/models", str(root / "models"))]
        ports = sorted({int(a or b) for a, b in LOCAL_PORT.findall(text)})
        for port, free in zip(ports, free_ports(len(ports))):
            self.subs += [(f"localhost:{port}", f"127.0.0.1:{free}"), (f"127.0.0.1:{port}", f"127.0.0.1:{free}"),
                          (f"0.0.0.0:{port}", f"127.0.0.1:{free}"), (f"--port {port}", f"--port {free}"),
                          (f"--grpc_port {port}", f"--grpc_port {free}")]
        self.subs.append(("--host 0.0.0.0", "--host 127.0.0.1"))
        self.redis_port = dict(self.subs).get("127.0.0.1:6379", "").rpartition(":")[2]

    def sub(self, code: str) -> str:
        for old, new in self.subs:
            code = code.replace(old, new)
        return code

    def env(self) -> dict:
        bin_dir = os.path.dirname(sys.executable)
        return {**os.environ, "PYTHONPATH": ROOT, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONUNBUFFERED": "1"}

    def remote_hosts(self, code: str) -> None:
        """Servers for the remote tier's hosts (real beamzoo servers on free ports)."""
        from beamzoo.serve.models import Servable
        from beamzoo.serve.server import Server
        for host in sorted(set(REMOTE_HOST.findall(code)) - {old.removeprefix("http://") for old, _ in self.subs}):
            server = Server([Servable.from_model("efficientnet_lite0")], workers=1).start()
            self.servers.append(server)
            self.subs.append((f"http://{host}", server.url))

    def start_redis(self) -> None:
        if self.redis or not self.redis_port:
            return
        if shutil.which("redis-server") is None:
            pytest.skip("the Redis blocks need redis-server (.ci/run installs it)")
        self.redis = subprocess.Popen(["redis-server", "--port", self.redis_port, "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(self.root)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _answers(f"127.0.0.1:{self.redis_port}", redis=True), 30, "redis-server")

    def run(self, b: Block) -> str:
        """Run a block; its output (stdout and stderr)."""
        if "redis://" in b.code:
            self.start_redis()
        self.remote_hosts(b.code)
        code = self.sub(b.code)
        n = b.line
        if b.lang == "python":
            (self.root / f"block{n}.py").write_text(code)
            cmd = [sys.executable, f"block{n}.py"]
        else:
            (self.root / f"block{n}.sh").write_text("set -eo pipefail\n" + code)
            cmd = ["bash", f"block{n}.sh"]
        log = self.root / f"block{n}.log"
        with open(log, "w") as f:  # a file, not a pipe: a server left in the background keeps it open
            proc = subprocess.Popen(cmd, cwd=self.root, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        self.background.append(proc.pid)  # whatever it left running ends with the page
        output = log.read_text(errors="replace")
        assert rc == 0, f"{b.where} exited {rc}:\n{output[-4000:]}"
        served = [m for line in code.splitlines() if BACKGROUND.search(line) and "beamzoo serve" in line
                  for m in re.findall(r"--port (\d+)", line)]
        for port in served:
            wait_for(lambda: _answers(f"127.0.0.1:{port}") or not _group_alive(proc.pid), 300, f"{b.where}'s server")
            assert _group_alive(proc.pid), f"{b.where}: the server stopped:\n{log.read_text()[-4000:]}"
        for m in SUMMARY.finditer(output):
            inputs, scored, dead, done = (int(g or 0) for g in m.groups())
            assert inputs == scored + dead + done, f"{b.where}: {m[0]}"
        return output

    def close(self) -> None:
        for pgid in self.background:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for s in self.servers:
            s.stop()
        if self.redis:
            self.redis.terminate()
            self.redis.wait(timeout=30)
        deadline = time.monotonic() + 60
        for pgid in self.background:
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)


def _answers(hostport: str, redis: bool = False) -> bool:
    if redis:
        import redis as redis_lib
        try:
            return bool(redis_lib.Redis.from_url(f"redis://{hostport}/0", socket_timeout=1).ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False
    try:
        with urllib.request.urlopen(f"http://{hostport}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_for(ready, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not come up in {seconds} s"
        time.sleep(0.2)


# --- what each example must have done, beyond exiting 0 --------------------------------------------

def rows(ws: Workspace, folder: str, sub: str = "predictions") -> list[dict]:
    return read(ws.root / folder, sub)


def jpgs(ws: Workspace, pattern: str = "photos/**/*.jpg") -> int:
    return len(glob.glob(str(ws.root / pattern), recursive=True))


def check_scored(folder: str, pattern: str = "photos/**/*.jpg", sub: str = "predictions"):
    def check(ws, output):
        n = jpgs(ws, pattern)
        got = rows(ws, folder, sub)
        assert len(got) == n and all(r["label"] for r in got), (folder, len(got), n)
    return check


def check_own_api(folder: str):
    def check(ws, output):
        n = jpgs(ws)
        assert f"inputs: {n}  scored: {n}  dead letters: 0" in output
        assert len(rows(ws, folder)) == n
    return check


def check_beam_example(ws, output):
    lines = [line for f in glob.glob(str(ws.root / "out/beam/labels-*.tsv")) for line in open(f)]
    assert len(lines) == jpgs(ws, "photos/*.jpg") and all(len(line.split("\t")) == 3 for line in lines)


def check_runners_agree(ws, output):
    direct, edge = rows(ws, "out"), rows(ws, "out/edge")
    assert len(direct) == jpgs(ws)
    assert [(r["path"], r["label"]) for r in direct] == [(r["path"], r["label"]) for r in edge]


def check_classify_beam(ws, output):
    preds = [json.loads(line) for f in glob.glob(str(ws.root / "out/preds-predictions-*.jsonl")) for line in open(f)]
    dead = [line for f in glob.glob(str(ws.root / "out/preds-dead_letters-*.jsonl")) for line in open(f)]
    assert len(preds) == jpgs(ws, "photos/*.jpg") and not dead


def check_graphs(ws, output):
    n = jpgs(ws)
    assert len(rows(ws, "out/graphs", "answers")) == n
    tiles = rows(ws, "out/graphs", "tiles")
    assert len(tiles) == n and all(r["children"] == 4 and len(r["label"]) == 4 for r in tiles)


def check_ocr(ws, output):
    assert "inputs: 2  scored: 2  dead letters: 0" in output
    assert all(r["text"] for r in rows(ws, "out"))


def check_cascade(ws, output):
    got = rows(ws, "out/cascade")
    assert len(got) == jpgs(ws, "photos/*.jpg")
    assert {r["escalation"] for r in got} <= {"escalated", "not_needed"}
    assert all(r["model"] == ("efficientnet_lite2:1" if r["escalation"] == "escalated" else "efficientnet_lite0:1")
               for r in got)


def check_own_card(ws, output):
    for folder in ("out/mine", "out/repo"):
        got = rows(ws, folder)
        assert len(got) == jpgs(ws, "photos/*.jpg") and {r["label"] for r in got} <= {"cat", "not_cat"}
        assert {r["model"] for r in got} == {"cat_or_not:2"}
    assert {r["model"] for r in rows(ws, "out/chosen")} == {"efficientnet_lite2:1"}


def check_run_inference(ws, output):
    assert output.count("[") >= 2  # two arrays of logits printed


def check_resume(ws, output):
    n = jpgs(ws)
    assert f"inputs: {n}  scored: 0  dead letters: 0  already done: {n}" in output
    assert len(rows(ws, "out")) == n


def check_export(folder: str):
    def check(ws, output):
        assert len(rows(ws, folder)) == jpgs(ws, "photos/*.jpg")
    return check


def check_tf_serving(ws, output):
    assert '"label":"tiger cat"' in output and '"labels":1000' in output  # a prediction; the metadata


def check_kserve(ws, output):
    assert '"data":["tiger cat"]' in output and '"name":"efficientnet_lite0"' in output


def check_client(ws, output):
    label, data = output.strip().splitlines()[-1].split(" [", 1)  # predict's label, then infer's
    assert label and data == f"'{label}']", output[-500:]


def check_remote_tier(ws, output):
    got = rows(ws, "out")
    assert len(got) == jpgs(ws, "photos/*.jpg")
    urls = {s.url for s in ws.servers}
    escalated = [r for r in got if r.get("cloud_endpoint")]
    assert escalated and {r["cloud_endpoint"] for r in escalated} <= urls
    assert all(r["cloud_label"] == r["label"] for r in escalated)  # the same model answered, remotely


def check_followed(ws, output):
    got = rows(ws, "out/follow")
    assert len(got) == jpgs(ws, "photos/*.jpg") and {r["model"] for r in got} == {"cat_or_not:2"}


def check_tritonclient(ws, output):
    label, scores = output.strip().splitlines()[-1].split(" [", 1)
    assert label == "missile" and len(scores.split()) == 3, output[-500:]  # photos/rocket.jpg, as the batch says


def check_grpc(ws, output):
    assert output.strip().splitlines()[-1] == "missile", output[-500:]


def json_values(text: str) -> list:
    """The JSON values written one after another (curl adds no newline)."""
    decoder, at, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        out.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return out


def check_repository(ws, output):
    index, unloaded, loaded = json_values(output)[-3:]
    assert index == [{"name": "cat_or_not", "version": "2", "state": "READY", "reason": ""}], index
    assert loaded == {"name": "cat_or_not", "versions": ["2"]}, loaded
    assert unloaded["name"] == "cat_or_not", unloaded


def check_tuned(ws, output):
    config = yaml.safe_load((ws.root / "tuned.yaml").read_text())
    assert config["graph"] == "classify" and config["measured"]["agreement"] >= 0.8, config
    assert (ws.root / "tune-report" / "README.md").is_file() and (ws.root / "tune-report" / "cost_throughput.png").is_file()
    got = rows(ws, "out/tuned")
    assert len(got) == jpgs(ws) and {r["model"] for r in got} == {config["knobs"]["model"]}


def check_served_config(ws, output):
    config = yaml.safe_load((ws.root / "served.yaml").read_text())
    assert set(config["serve"]) >= {"max_batch", "max_delay_ms", "workers"}, config


def check_redis(ws, output):
    assert "'label'" in output and "'error'" not in output


def check_flink(ws, output):
    n = jpgs(ws)
    assert f"inputs: {n}  scored: {n}  dead letters: 0" in output and len(rows(ws, "out")) == n


CHECKS = {  # page -> {a line of the block: its check}
    "README.md": {
        "--output out/cli/": check_scored("out/cli"),
        "beam.io.WriteToText(\"out/beam/labels\"": check_beam_example,
        "bz.WriteParquet(\"out/api/predictions\")": check_own_api("out/api"),
    },
    "docs/scoring.md": {"--output out/edge/ --runner=EdgeRunner": check_runners_agree,
                        "--model_refresh 30": check_followed},
    "docs/ocr.md": {"python pipelines/ocr_images.py": check_ocr},
    "docs/pipelines.md": {
        "ls photos/*.jpg > paths.txt": check_classify_beam,
        "stats = p.run([\"--runner=EdgeRunner\"])": check_own_api("out"),
        "bz.Tiles(rows=2, cols=2)": check_graphs,
    },
    "docs/export.md": {"beamzoo run bundle/": check_export("out"),
                       "beamzoo run signed/ --trust": check_export("out/signed")},
    "docs/cascades.md": {"--output out/cascade/": check_cascade},
    "docs/zoo.md": {"--model my/cards/cat.yaml": check_own_card,
                    "RunInference(CardModelHandler": check_run_inference},
    "docs/guarantees.md": {"--resume": check_resume},
    "docs/serving.md": {"v1/models/efficientnet_lite0:predict": check_tf_serving,
                        "v2/models/efficientnet_lite0/infer": check_kserve,
                        "with Client(": check_client,
                        "httpclient.InferInput(": check_tritonclient,
                        "grpcclient.InferInput(": check_grpc,
                        "/v2/repository/index": check_repository,
                        "RemoteClassify([": check_remote_tier,
                        "QueueClient(": check_redis},
    "docs/flink.md": {"--flink_master=[local]": check_flink},
    "docs/tuning.md": {"--output out/tuned/": check_tuned, "--config served.yaml --port": check_served_config},
}


def _marks(page: Path) -> list:
    marks = [pytest.mark.slow]
    if "--runner=FlinkRunner" in "".join(b.code for b in blocks(page) if not b.skip):
        marks += [pytest.mark.flink, pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")]
    return marks


RUN_PAGES = [p for p in PAGES if any(b.lang in RUNNABLE and not b.skip for b in blocks(p))]


@pytest.mark.integration
@pytest.mark.parametrize("page", [pytest.param(p, id=page_id(p), marks=_marks(p)) for p in RUN_PAGES])
def test_the_examples_of_a_page_run_as_written(page, tmp_path):
    checks = dict(CHECKS.get(page_id(page), {}))
    todo = [b for b in blocks(page) if b.lang in RUNNABLE and not b.skip]
    for key in checks:
        assert sum(key in b.code for b in todo) == 1, f"{page_id(page)}: no one block runs {key!r}"
    ws = Workspace(tmp_path, page)
    try:
        for b in todo:
            output = ws.run(b)
            for key, check in checks.items():
                if key in b.code:
                    check(ws, output)
    finally:
        ws.close()


def test_every_check_belongs_to_a_page():
    assert set(CHECKS) <= {page_id(p) for p in RUN_PAGES}

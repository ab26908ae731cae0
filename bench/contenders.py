"""The contenders. Each runs inside its own child process (see run.py).

Every function takes a Ctx and returns a dict with at least ``seconds`` (wall
time of the run call, model load included), ``cpu_s`` (process CPU time over
the same span), ``first_result_s`` (or None) and ``labels`` ({file name:
top-1 label}). Imports happen before the clock starts.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import pixels

BATCH = 32


@dataclass
class Ctx:
    files: str          # directory of *.jpg
    work: str           # scratch directory for this contender's output
    model: str          # ONNX file
    labels: str         # labels text file, one per line
    cores: int
    limit_sample: int = 512
    ref_threads: int = 0
    flink_master: str = "[local]"

    @property
    def paths(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.files, "*.jpg")))


def parquet_labels(directory: str, pattern: str = "predictions-*.parquet") -> dict[str, str]:
    """{file name: top-1 label} from the Parquet files ``pattern`` matches in ``directory``:
    ``predictions-*.parquet`` (the reference loop, Beam stock) or, for beamzoo's own
    layout (``<work>/predictions/part-*.parquet``), ``parquet_labels(work/predictions, "*.parquet")``."""
    import pyarrow.parquet as pq
    out = {}
    for p in sorted(glob.glob(os.path.join(glob.escape(directory), pattern))):
        t = pq.read_table(p, columns=["path", "label"])
        for path, label in zip(t.column("path").to_pylist(), t.column("label").to_pylist()):
            out[os.path.basename(path)] = label
    return out


def write_predictions(directory: str, paths: list[str], labels: list[str], scores: list[float]):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(directory, exist_ok=True)
    table = pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
                      "score": pa.array(scores, pa.float32())})
    pq.write_table(table, os.path.join(directory, "predictions-00000-of-00001.parquet"))


def top1(logits: np.ndarray, names: list[str]) -> tuple[list[str], list[float]]:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    idx = probs.argmax(axis=1)
    return [names[i] for i in idx], probs[np.arange(len(idx)), idx].tolist()


def session(model: str, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# ---- limit: each stage alone, CPU seconds per image -------------------------

def limit(ctx: Ctx) -> dict:
    """CPU-seconds per image of each stage measured alone, at its best setting."""
    import cv2
    paths = ctx.paths
    sample = paths[::max(1, len(paths) // ctx.limit_sample)][:ctx.limit_sample]
    stages = {"decode": {}, "preprocess": {}, "inference": {}}

    def keep_best(stage, key, value):  # each setting is timed twice; keep the faster
        stages[stage][key] = min(value, stages[stage].get(key, value))

    inputs = []
    for _ in range(2):
        for threads in sorted({1, ctx.cores}):
            cv2.setNumThreads(threads)
            for p in sample[:16]:  # warm up
                pixels.preprocess(pixels.decode(pixels.read(p)))
            dec = pre = 0.0
            for p in sample:
                c0 = time.process_time()
                img = pixels.decode(pixels.read(p))   # file read + header + JPEG decode
                c1 = time.process_time()
                x = pixels.preprocess(img)            # resize + crop + normalize
                dec += c1 - c0
                pre += time.process_time() - c1
                if len(inputs) < 256:
                    inputs.append(x)
            keep_best("decode", f"cv2 threads {threads}", dec / len(sample))
            keep_best("preprocess", f"cv2 threads {threads}", pre / len(sample))
    x_all = np.stack(inputs)
    wall = {}
    for threads in (1, 2):
        sess = session(ctx.model, threads)
        name = sess.get_inputs()[0].name
        for _ in range(2):
            for batch in (b for b in (1, 8, 32) if b <= len(x_all)):  # a tiny smoke run has few inputs
                sess.run(None, {name: x_all[:batch]})  # warm up
                n = len(x_all) - len(x_all) % batch
                c0, t0 = time.process_time(), time.perf_counter()
                for i in range(0, n, batch):
                    sess.run(None, {name: x_all[i:i + batch]})
                key = f"batch {batch}, intra-op threads {threads}"
                keep_best("inference", key, (time.process_time() - c0) / n)
                wall[key] = max(wall.get(key, 0), n / (time.perf_counter() - t0))
        del sess
    best = {s: min(v.items(), key=lambda kv: kv[1]) for s, v in stages.items()}
    cpu_per_image = sum(v for _, v in best.values())
    return {"seconds": None, "first_result_s": None, "labels": {},
            "images_per_s": ctx.cores / cpu_per_image,
            "cpu_s_per_image": cpu_per_image,
            "best": {s: {"setting": k, "cpu_ms_per_image": round(v * 1e3, 3)} for s, (k, v) in best.items()},
            "all_cpu_ms_per_image": {s: {k: round(v * 1e3, 3) for k, v in d.items()} for s, d in stages.items()},
            "inference_wall_images_per_s": {k: round(v, 1) for k, v in wall.items()},
            "sample": {"decode_preprocess": len(sample), "inference": len(x_all)}}


# ---- reference: hand-written onnxruntime + OpenCV loop ----------------------

def reference(ctx: Ctx) -> dict:
    """Batches of 32 decoded by a thread pool while the main thread runs inference."""
    names = pixels.load_labels(ctx.labels)
    paths = ctx.paths
    t0, c0 = time.perf_counter(), time.process_time()
    sess = session(ctx.model, ctx.ref_threads)
    in_name = sess.get_inputs()[0].name
    batches = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]

    def load_batch(batch):
        return np.stack([pixels.load(p) for p in batch])

    labels, scores, first = [], [], None
    with ThreadPoolExecutor(ctx.cores) as pool:
        ahead = ctx.cores + 1  # batches being decoded while one is inferred
        pending = deque(pool.submit(load_batch, b) for b in batches[:ahead])
        nxt = len(pending)
        while pending:
            x = pending.popleft().result()
            if nxt < len(batches):
                pending.append(pool.submit(load_batch, batches[nxt]))
                nxt += 1
            lab, sc = top1(sess.run(None, {in_name: x})[0], names)
            labels += lab
            scores += sc
            first = first or time.perf_counter() - t0
    write_predictions(ctx.work, paths, labels, scores)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "first_result_s": first, "scored": len(labels), "failed": 0,
            "labels": {os.path.basename(p): lab for p, lab in zip(paths, labels)},
            "settings": {"batch": BATCH, "decode_threads": ctx.cores, "intra_op_threads": ctx.ref_threads}}


# ---- Beam stock: RunInference + OnnxModelHandlerNumpy on FnApiRunner --------

_FIRST: dict[str, float] = {}


def _mark_first(row):
    _FIRST.setdefault("t", time.perf_counter())
    return row


def _decode(path):
    return path, pixels.load(path)


def _to_row(kv, names):
    path, result = kv
    lab, sc = top1(np.asarray(result.inference)[None], names)
    return {"path": path, "label": lab[0], "score": sc[0]}


def beam_stock(ctx: Ctx) -> dict:
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    names = pixels.load_labels(ctx.labels)
    paths = ctx.paths
    handler = KeyedModelHandler(OnnxModelHandlerNumpy(
        ctx.model, providers=["CPUExecutionProvider"], min_batch_size=BATCH, max_batch_size=BATCH))
    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("score", pa.float32())])
    t0, c0 = time.perf_counter(), time.process_time()
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([])) as p:
        (p
         | "Paths" >> beam.Create(paths)
         | "Decode" >> beam.Map(_decode)
         | "Infer" >> RunInference(handler)
         | "Top1" >> beam.Map(_to_row, names)
         | "First" >> beam.Map(_mark_first)
         | "Write" >> beam.io.WriteToParquet(os.path.join(ctx.work, "predictions"), schema,
                                             file_name_suffix=".parquet"))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    labels = parquet_labels(ctx.work, "predictions-*.parquet")
    first = _FIRST["t"] - t0 if "t" in _FIRST else None
    return {"seconds": seconds, "cpu_s": cpu, "first_result_s": first, "scored": len(labels), "failed": 0,
            "labels": labels, "first_result_note": "first row reaching the Parquet writer"}


# ---- beamzoo ----------------------------------------------------------------

def _beamzoo(ctx: Ctx, runner: str, beam_args=(), **limits) -> dict:
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners.edge import EdgeRunner
    from beamzoo import zoo

    importlib.import_module("beamzoo.runners.options")  # run() imports it lazily
    if runner != "EdgeRunner":  # import Beam before the clock starts
        importlib.import_module("beamzoo.runners.beam")
        importlib.import_module("beamzoo.beam")
        importlib.import_module("apache_beam.io.parquetio")  # beamzoo.runners.beam imports it lazily
    # writes ctx.work/predictions/part-*.parquet and ctx.work/dead_letter/part-*.parquet
    graph = score_images(os.path.join(ctx.files, "*.jpg"), ctx.work, zoo.get("efficientnet_lite0"), **limits)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = run(graph, runner, list(beam_args), edge=EdgeRunner(progress=False))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    cpu += decode_workers_cpu()  # the isolated decode's worker processes (made during the run)
    first = None
    if stats.first_result_s is not None:  # counted by run() from when the runner starts
        first = seconds - stats.seconds + stats.first_result_s
    labels = parquet_labels(os.path.join(ctx.work, "predictions"), "*.parquet")
    return {"seconds": seconds, "cpu_s": cpu, "first_result_s": first, "scored": stats.scored,
            "failed": stats.failed, "labels": labels,
            "steps": {k: v.to_dict() for k, v in stats.steps.items()}}  # where the time went, per step


def decode_workers_cpu() -> float:
    """CPU seconds of the live decode workers of this process (none are replaced in a clean run)."""
    from beamzoo.core import resources
    from beamzoo.core.isolate import IsolatedPool
    total = 0.0
    for pool in [v for v in resources._made.values() if isinstance(v, IsolatedPool)]:
        for pid in pool.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def beamzoo_edge(ctx: Ctx) -> dict:
    return _beamzoo(ctx, "EdgeRunner")


def beamzoo_edge_inproc(ctx: Ctx) -> dict:
    """The EdgeRunner decoding in its own process, without the per-input limits."""
    return _beamzoo(ctx, "EdgeRunner", isolate=False)


def beamzoo_direct(ctx: Ctx) -> dict:
    return _beamzoo(ctx, "DirectRunner")


# ---- beamzoo on Flink ------------------------------------------------------

def beamzoo_flink(ctx: Ctx) -> dict:
    # Note: on Flink the work may run in other processes (SDK harness, task
    # managers), so this child's peak RSS is only the launcher's.
    from beamzoo.runners.flink import pipeline_args
    return _beamzoo(ctx, "FlinkRunner", pipeline_args(ctx.flink_master))


# ---- Ray Data: map_batches with an actor pool of onnxruntime sessions --------

ACTOR_CPUS = 0.75


class RayScorer:
    """A Ray Data actor: one single-thread onnxruntime session; reads, decodes and preprocesses
    its batch of paths (the reference loop's pixel work), then infers."""

    def __init__(self, model: str, labels: str):
        import cv2
        cv2.setNumThreads(1)  # one CPU per actor
        self.sess = session(model, 1)
        self.in_name = self.sess.get_inputs()[0].name
        self.names = pixels.load_labels(labels)

    def __call__(self, batch: dict) -> dict:
        paths = batch["path"]
        x = np.stack([pixels.load(p) for p in paths])
        lab, sc = top1(self.sess.run(None, {self.in_name: x})[0], self.names)
        return {"path": paths, "label": np.asarray(lab), "score": np.asarray(sc, np.float32)}


def _descendants(root: int) -> list[int]:
    """Pids of every live process below ``root`` (Ray's GCS, raylet, agents and workers)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [root]
    while todo:
        up = todo.pop()
        kids = [pid for pid, pp in parent.items() if pp == up]
        out += kids
        todo += kids
    return out


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and of its children it has already waited for."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone since it was listed
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _pss_mib(pids) -> float:
    """Summed proportional set size (shared pages split among the processes that map them)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def ray_data(ctx: Ctx) -> dict:
    """``from_items(paths) | map_batches(RayScorer, ActorPoolStrategy(size=cores)) | write_parquet``
    on a local Ray started in the timed span. CPU and memory: this process and every Ray process
    below it (GCS, raylet, agents, workers)."""
    import threading

    import ray
    import ray.data

    # the workers import this module (RayScorer) and pixels from here
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    paths = ctx.paths
    me, peak, stop = os.getpid(), [0.0], threading.Event()

    def sample_memory():  # Ray's processes come and go; sample their summed PSS twice a second
        while not stop.wait(0.5):
            peak[0] = max(peak[0], _pss_mib([me] + _descendants(me)))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    t0, w0, c0 = time.perf_counter(), time.time(), time.process_time()
    sampler.start()
    ray.init(address="local", num_cpus=ctx.cores, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.path.join(ctx.work, "ray"))
    init_s = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = os.path.join(ctx.work, "predictions")
    # one actor per core, each running one thread; 0.75 of a CPU each in Ray's accounting leaves
    # room for the write tasks (at 1 CPU each the writes wait until every actor is done)
    (ray.data.from_items([{"path": p} for p in paths])
     .map_batches(RayScorer, fn_constructor_args=(ctx.model, ctx.labels), batch_size=BATCH,
                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ctx.cores),
                  num_cpus=ACTOR_CPUS)
     .write_parquet(out, ray_remote_args={"num_cpus": 1 - ACTOR_CPUS}))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ray_pids = _descendants(me)
    peak[0] = max(peak[0], _pss_mib([me] + ray_pids))
    names = {pid: _cmdline(pid)[:60] for pid in ray_pids}
    at_end = {f"{pid} {names[pid]}": round(_pss_mib([pid]), 1) for pid in ray_pids}
    workers = [pid for pid in ray_pids if names[pid].startswith("ray::")]
    ray_cpu = sum(_proc_cpu_s(pid) for pid in ray_pids)
    workers_cpu = sum(_proc_cpu_s(pid) for pid in workers)
    cpu = time.process_time() - c0 + ray_cpu
    ray.shutdown()
    files = glob.glob(os.path.join(out, "*.parquet"))
    first = min(os.stat(f).st_mtime for f in files) - w0 if files else None
    labels = parquet_labels(out, "*.parquet")
    return {"seconds": seconds, "cpu_s": cpu, "first_result_s": first, "scored": len(labels),
            "failed": len(paths) - len(labels), "labels": labels, "peak_rss_mib": peak[0],
            "ray_init_s": init_s, "ray_processes": len(ray_pids), "ray_cpu_s": ray_cpu,
            "ray_workers_cpu_s": workers_cpu, "ray_pss_mib_at_end": at_end,
            "first_result_note": "first Parquet file written (its mtime)",
            "peak_rss_note": "summed PSS of this process and all Ray processes, sampled every 0.5 s",
            "settings": {"batch": BATCH, "actors": ctx.cores, "num_cpus_per_actor": ACTOR_CPUS,
                         "num_cpus_per_write": 1 - ACTOR_CPUS, "intra_op_threads": 1, "ray": ray.__version__}}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


CONTENDERS = {
    "limit": limit,
    "reference": reference,
    "beam_stock": beam_stock,
    "beamzoo_edge": beamzoo_edge,
    "beamzoo_edge_inproc": beamzoo_edge_inproc,
    "beamzoo_direct": beamzoo_direct,
    "beamzoo_flink": beamzoo_flink,
    "ray_data": ray_data,
}

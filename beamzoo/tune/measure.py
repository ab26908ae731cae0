"""Measuring one configuration on the sample, as a whole-graph run.

``run_config`` runs the graph on the edge runner (``--serve``: requests arriving at
``--rate`` through ``beamzoo serve``'s batcher and engine) after a warm-up run on two of
the inputs (models loaded, decoder processes started), and returns what it measured:
throughput (inputs/s), latency_p95 (read to written, or request to answer), cost
(CPU-core seconds per input), agreement (with a reference's answers), and the run's
per-step metrics and answers, from which ``beamzoo.tune.profile`` reads step costs.

CPU is counted for the whole process tree (the isolated decoders' worker processes and
onnxruntime's threads included): from /proc on Linux, elsewhere this process's own.
"""
from __future__ import annotations

import math
import os
import resource
import shutil
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from beamzoo.core.context import Hooks
from beamzoo.core.graph import DEAD
from beamzoo.pipeline import run
from beamzoo.runners.edge import EdgeRunner
from beamzoo.serve.knobs import SERVER_KNOBS

_runs = iter(range(1 << 30))


def tree_cpu() -> float:
    """CPU seconds used so far by this process, its reaped children and its live descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        u = resource.getrusage(who)
        total += u.ru_utime + u.ru_stime
    return total + _descendants_cpu()


def _descendants_cpu() -> float:
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return 0.0
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    todo, total = list(children.get(os.getpid(), ())), 0
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, ())
    return total / os.sysconf("SC_CLK_TCK")


class Latencies(Hooks):
    """When inputs leave the source and answers reach a sink; the k-th answer is matched to the
    k-th input read (rows overtake each other little, and a quantile cares not which row is which)."""

    def __init__(self):
        self.read: list[tuple[float, int]] = []
        self.written: list[tuple[float, int]] = []
        self.answers: set[str] = set()

    def run_started(self, ctx, plan):
        self.answers = {st.id for s in plan.stages if s.kind == "sink" and DEAD not in s.inputs for st in s.steps}

    def batch_done(self, ctx, step, kind, sample):
        if kind == "source":
            self.read.append((time.perf_counter(), sample.rows_out))
        elif kind == "sink" and step in self.answers:
            self.written.append((time.perf_counter(), sample.rows_in))

    def p95(self) -> float | None:
        read = np.repeat([t for t, _ in self.read], [n for _, n in self.read])
        written = np.repeat([t for t, _ in self.written], [n for _, n in self.written])
        n = min(len(read), len(written))
        return float(np.percentile(np.sort(written)[:n] - np.sort(read)[:n], 95)) if n else None


@dataclass
class Run:
    """One measured configuration: ``values`` (throughput, latency_p95, cost, agreement, seconds,
    inputs, failed), every step's metrics, the stages, and the answers by input."""

    config: dict
    values: dict
    steps: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)
    answers: dict = field(default_factory=dict)  # input name -> (answer, score)
    cpu_s: float = 0.0
    inputs: int = 0
    warm_s: float = 0.0  # the warm-up run's wall seconds (a cold start when it first loads a model)
    graph: object = None


def agreement(answers: dict, reference: dict | None) -> float | None:
    """The fraction of the inputs both answered on which ``answers`` agree with ``reference``."""
    if not reference:
        return None
    common = [k for k in answers if k in reference]
    return sum(answers[k][0] == reference[k][0] for k in common) / len(common) if common else None


def run_config(job, config: dict, reference: dict | None = None, chunk_size: int | None = None) -> Run:
    """Measure ``config`` on the job's sample (``chunk_size``: the edge runner's rows per task,
    which bounds what a step batches)."""
    if job.serve:
        return serve_config(job, config, reference)
    edge = {"workers": config.get("workers", job.cores), "progress": False}
    if chunk_size:
        edge["chunk_size"] = chunk_size
    t0 = time.perf_counter()
    _edge_run(job, config, job.warm_dir, edge)  # its models loaded
    warm_s = time.perf_counter() - t0
    if not job.warmed:  # the first time, every decoder process warmed on every kind of input too
        _edge_run(job, config, job.sample_dir, edge)
        job.warmed = True
    hook = Latencies()
    graph, stats, answers, cpu = _edge_run(job, config, job.sample_dir, edge, hook)
    job.measuring_s += time.perf_counter() - t0
    inputs = stats.inputs or 1
    values = {"throughput": stats.inputs / stats.seconds if stats.seconds else None,
              "latency_p95": hook.p95(), "cost": cpu / inputs, "agreement": agreement(answers, reference),
              "seconds": stats.seconds, "inputs": stats.inputs, "failed": stats.failed}
    return Run(config, values, stats.steps, stats.stages, answers, cpu, inputs, warm_s, graph)


def _edge_run(job, config, folder, edge, hook=None):
    out = os.path.join(job.workdir, f"run{next(_runs)}")
    try:
        graph = job.graph.build(config, os.path.join(folder, "*"), out)
        c0 = tree_cpu()
        stats = run(graph, "EdgeRunner", edge=EdgeRunner(**edge), progress=False, max_dead_fraction=1.0,
                    hooks=[hook] if hook else ())
        cpu = tree_cpu() - c0
        return graph, stats, _answers(os.path.join(out, "predictions"), job.graph.answer), cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _answers(folder: str, column: str) -> dict:
    if not os.path.isdir(folder) or not os.listdir(folder):
        return {}
    t = pq.read_table(folder)
    if column not in t.schema.names:  # a bundle's graph: whichever it answers with
        column = next((c for c in ("label", "text") if c in t.schema.names), None)
        if column is None:
            return {}
    scores = t.column("score").to_pylist() if "score" in t.schema.names else [None] * t.num_rows
    return {os.path.basename(p): (a, s) for p, a, s in zip(t.column("path").to_pylist(),
                                                           t.column(column).to_pylist(), scores)}


def serve_config(job, config: dict, reference: dict | None = None) -> Run:
    """Requests of one input each, arriving at ``job.rate``/s (Poisson, seeded), through a
    ``ModelService`` (``beamzoo serve``'s batcher, workers and engine; no HTTP)."""
    from beamzoo.serve.batcher import QueueFull
    from beamzoo.serve.metrics import Metrics
    from beamzoo.serve.service import ModelService
    t0 = time.perf_counter()
    servable = job.graph.servable(config)
    knob = {k: config.get(k, SERVER_KNOBS[k].default) for k in ("max_batch", "max_delay_ms", "max_queue")}
    service = ModelService(servable, Metrics(), knob["max_batch"], knob["max_delay_ms"] / 1000, knob["max_queue"],
                           config.get("workers") or job.cores)
    try:
        data = []
        for p in job.sample:
            with open(p, "rb") as f:
                data.append(f.read())
        service.submit(data[:1]).result()  # warm: sessions made, decoders started
        warm_s = time.perf_counter() - t0
        arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / job.rate, len(data)))
        done, lock, finished = {}, threading.Lock(), threading.Event()

        def answered(i, sent):
            def call(future):
                with lock:
                    done[i] = (time.perf_counter() - sent, future.result()[0])
                    if len(done) == len(data):
                        finished.set()
            return call
        rejected = 0
        c0, start = tree_cpu(), time.perf_counter()
        for i, d in enumerate(data):
            wait = start + arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                service.submit([d]).add_done_callback(answered(i, time.perf_counter()))
            except QueueFull:
                rejected += 1
                with lock:
                    done[i] = (math.inf, {"error": "queue full"})
                    if len(done) == len(data):
                        finished.set()
        finished.wait(SERVER_KNOBS["timeout_s"].default)
        seconds = time.perf_counter() - start
        cpu = tree_cpu() - c0
    finally:
        service.close()
    job.measuring_s += time.perf_counter() - t0
    names = sorted(os.listdir(job.sample_dir))  # the sample's links, in its order
    answers = {names[i]: (r.get("label", r.get("text")), r.get("score")) for i, (_, r) in done.items()
               if "error" not in r}
    latencies = [lat for lat, _ in done.values()]
    values = {"throughput": len(answers) / seconds, "latency_p95": float(np.percentile(latencies, 95)),
              "cost": cpu / len(data), "agreement": agreement(answers, reference), "seconds": seconds,
              "inputs": len(data), "failed": len(data) - len(answers), "rejected": rejected}
    return Run(config, values, dict(service.ctx.steps), [], answers, cpu, len(data), warm_s)


__all__ = ["Latencies", "Run", "agreement", "run_config", "serve_config", "tree_cpu"]

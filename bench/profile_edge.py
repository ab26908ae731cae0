"""Where the edge runner spends CPU, step by step, next to the bare stage costs.

    python bench/profile_edge.py --n 500 [--cprofile] [--infer-in-pool]

Wraps each step's ``process`` to add up its thread CPU time, runs the edge
runner (through beamzoo.pipeline.run, as the benchmark does) on the benchmark
image set, and prints CPU ms per image for each step beside the same work done
with plain OpenCV/onnxruntime (bench/pixels.py). With --cprofile it also
profiles the parallel steps in one thread and prints the top functions by own
time. --infer-in-pool tries a suggested change without editing beamzoo:
inference with one intra-op thread, marked parallel, so the pool's threads
run whole chunks (read .. infer) side by side.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wrap_steps(graph, cpu: dict, calls: dict):
    lock = threading.Lock()
    for step in graph.steps:
        inner = step.process

        def timed(batch, inner=inner, name=step.name):
            c0 = time.thread_time()
            out = inner(batch)
            with lock:
                cpu[name] += time.thread_time() - c0
                calls[name] += 1
            return out
        step.process = timed


def bare_costs(paths: list[str], model: str) -> dict:
    """CPU ms per image of the same work without beamzoo (one thread, batch 32)."""
    import numpy as np

    import contenders
    import pixels
    read = dec = pre = 0.0
    xs = []
    for p in paths:
        c0 = time.thread_time()
        data = pixels.read(p)
        c1 = time.thread_time()
        img = pixels.decode(data)
        c2 = time.thread_time()
        xs.append(pixels.preprocess(img))
        c3 = time.thread_time()
        read, dec, pre = read + c1 - c0, dec + c2 - c1, pre + c3 - c2
    sess = contenders.session(model, 0)
    x = np.stack(xs)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:32]})
    c0 = time.process_time()
    for i in range(0, len(x), 32):
        sess.run(None, {name: x[i:i + 32]})
    infer = time.process_time() - c0
    n = len(paths)
    return {"read": read / n * 1e3, "decode": dec / n * 1e3, "resize": pre / n * 1e3,
            "infer (process CPU, batch 32, default threads)": infer / n * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--infer-in-pool", action="store_true")
    args = p.parse_args(argv)

    import images
    import pyarrow as pa
    from beamzoo.core import Hints
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners import EdgeRunner
    from beamzoo.zoo import EFFICIENTNET_LITE0

    directory = images.make_set(args.cache, args.n, args.seed)
    paths = images.image_paths(directory)
    graph = score_images(os.path.join(directory, "*.jpg"), EFFICIENTNET_LITE0,
                         intra_op_threads=1 if args.infer_in_pool else 0)
    edge = EdgeRunner(progress=False)
    if args.infer_in_pool:
        for step in graph.steps:
            if step.name == "infer":
                step.hints = Hints(batch_size=step.hints.batch_size, parallel=True)
        edge = EdgeRunner(progress=False, chunk_size=8)
    cpu, calls, seen = defaultdict(float), defaultdict(int), {}
    original = EdgeRunner.run

    def wrapped_run(self, g, *a, **kw):  # time the steps of the graph the runner really gets
        wrap_steps(g, cpu, calls)
        seen["graph"] = g
        return original(self, g, *a, **kw)
    EdgeRunner.run = wrapped_run
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = time.process_time(), time.perf_counter()
        stats = run(graph, os.path.join(tmp, "out"), "EdgeRunner", edge=edge)
        total_cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    EdgeRunner.run = original
    n = len(paths)
    print(f"edge runner: {n / wall:.1f} images/s, process CPU {total_cpu / n * 1e3:.2f} ms/image, "
          f"scored {stats.scored} (load average {os.getloadavg()[0]:.1f})")
    print(f"{'step':<10} {'thread CPU ms/img':>18} {'calls':>6}")
    for name, v in cpu.items():
        print(f"{name:<10} {v / n * 1e3:18.2f} {calls[name]:>6}")
    print(f"{'(other)':<10} {(total_cpu - sum(cpu.values())) / n * 1e3:18.2f}   "
          "(onnxruntime pool threads, runner, sink, setup)")
    bare = bare_costs(paths, str(EFFICIENTNET_LITE0.onnx_path()))
    print("same work without beamzoo (one thread):")
    for k, v in bare.items():
        print(f"  {k:<48} {v:6.2f} ms/img")

    if args.cprofile:
        g = seen["graph"]
        head = [s for s in g.steps if s.hints.parallel and s.name not in ("infer", "topk")]
        prof = cProfile.Profile()
        prof.enable()
        for i in range(0, n, 8):
            batch = pa.record_batch([pa.array(paths[i:i + 8], pa.string())], schema=g.source.schema)
            for step in head:
                batch = step.process(batch)[0]
        prof.disable()
        print(f"cProfile of {[s.name for s in head]} in one thread, chunks of 8:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())

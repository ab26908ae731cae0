"""Where the edge runner spends CPU, step by step, next to the bare stage costs.

    python bench/profile_edge.py --n 500 [--cprofile]

Wraps each step's ``process`` to add up its thread CPU time, runs the edge
runner with its defaults (through beamzoo.pipeline.run, as the benchmark
does) on the benchmark image set, and prints CPU ms per image for each step
beside the same work done with plain OpenCV/onnxruntime (bench/pixels.py) at
the same settings (one intra-op thread, batches of 4). With --cprofile it
also profiles the steps before inference in one thread and prints the top
functions by own time.
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


def timed_operators(original, cpu: dict, calls: dict):
    """A ``Stage.operators`` whose operators add up the thread CPU time of their ``process``
    (each runner thread builds its own operators from the planned stage)."""
    lock = threading.Lock()

    def operators(stage):
        ops = original(stage)
        for op in ops:
            if op.kind in ("source", "sink"):  # the runner reads and writes these itself
                continue
            inner = op.process

            def timed(batch, inner=inner, name=op.id):
                c0 = time.thread_time()
                out = inner(batch)
                with lock:
                    cpu[name] += time.thread_time() - c0
                    calls[name] += 1
                return out
            op.process = timed
        return ops
    return operators


def bare_costs(paths: list[str], model: str, batch: int) -> dict:
    """CPU ms per image of the same work without beamzoo (one thread)."""
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
    sess = contenders.session(model, 1)
    x = np.stack(xs)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:batch]})
    c0 = time.thread_time()
    for i in range(0, len(x), batch):
        sess.run(None, {name: x[i:i + batch]})
    infer = time.thread_time() - c0
    n = len(paths)
    return {"read": read / n * 1e3, "decode (reduced-size JPEG)": dec / n * 1e3,
            "resize + crop + scale": pre / n * 1e3, f"infer (batch {batch}, one thread)": infer / n * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--cprofile", action="store_true")
    args = p.parse_args(argv)

    import images
    from beamzoo.pipeline import run, score_images
    from beamzoo.plan import Stage, plan
    from beamzoo.runners import EdgeRunner
    from beamzoo import zoo

    directory = images.make_set(args.cache, args.n, args.seed)
    paths = images.image_paths(directory)
    edge = EdgeRunner(progress=False)
    cpu, calls, seen = defaultdict(float), defaultdict(int), {}
    original_run, original_operators = EdgeRunner.run, Stage.operators

    def wrapped_run(self, g, *a, **kw):  # the graph the runner really gets (with resume keys)
        seen["graph"] = g
        return original_run(self, g, *a, **kw)
    EdgeRunner.run = wrapped_run
    Stage.operators = timed_operators(original_operators, cpu, calls)  # time the planned steps
    try:
        with tempfile.TemporaryDirectory() as tmp:
            graph = score_images(os.path.join(directory, "*.jpg"), os.path.join(tmp, "out"),
                                 zoo.get("efficientnet_lite0"))
            c0, t0 = time.process_time(), time.perf_counter()
            stats = run(graph, "EdgeRunner", edge=edge)
            total_cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        EdgeRunner.run, Stage.operators = original_run, original_operators
    n = len(paths)
    print(f"edge runner: {n / wall:.1f} images/s, process CPU {total_cpu / n * 1e3:.2f} ms/image, "
          f"scored {stats.scored} (load average {os.getloadavg()[0]:.1f})")
    width = max([10, *map(len, cpu)])  # planned step ids, e.g. "decode+resize"
    print(f"{'step':<{width}} {'thread CPU ms/img':>18} {'calls':>6}")
    for name, v in cpu.items():
        print(f"{name:<{width}} {v / n * 1e3:18.2f} {calls[name]:>6}")
    print(f"{'(other)':<{width}} {(total_cpu - sum(cpu.values())) / n * 1e3:18.2f}   "
          "(model loading, the runner between steps, Parquet)")
    batch = seen["graph"].step("infer").params["batch_size"]
    bare = bare_costs(paths, str(zoo.get("efficientnet_lite0").onnx_path()), batch)
    print("same work without beamzoo (one thread):")
    for k, v in bare.items():
        print(f"  {k:<48} {v:6.2f} ms/img")

    if args.cprofile:
        stages = plan(seen["graph"]).stages  # as the runner planned it (decode and resize fused)
        (source,) = next(s for s in stages if s.kind == "source").operators()
        chain = next(s for s in stages if any(st.id == "infer" for st in s.steps)).operators()
        head = chain[:[op.id for op in chain].index("infer")]
        for op in head:
            op.setup()
        refs = list(source.refs())
        prof = cProfile.Profile()
        prof.enable()
        for i in range(0, n, 8):
            batch = source.to_batch(refs[i:i + 8]).ok
            for op in head:
                batch = op.process(batch).ok
        prof.disable()
        print(f"cProfile of {[op.id for op in head]} in one thread, chunks of 8:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())

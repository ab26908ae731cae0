"""Where the edge runner spends CPU, step by step, next to the bare stage costs.

    python bench/profile_edge.py --n 500 [--cprofile]

Runs the edge runner with its defaults (through beamzoo.pipeline.run, as the
benchmark does) on the benchmark image set and prints, from the run's own
per-step metrics (``RunStats.steps``), CPU ms per image in each step's thread,
its wall time and what it waited, beside the same work done with plain
OpenCV/onnxruntime (bench/pixels.py) at the same settings (one intra-op thread,
batches of 4). The decode step's CPU is mostly in its worker processes, added
up apart. With --cprofile it also profiles the steps before inference in one
thread and prints the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
    from contenders import decode_workers_cpu

    from beamzoo import zoo
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners.edge import EdgeRunner

    directory = images.make_set(args.cache, args.n, args.seed)
    paths = images.image_paths(directory)
    with tempfile.TemporaryDirectory() as tmp:
        graph = score_images(os.path.join(directory, "*.jpg"), os.path.join(tmp, "out"), zoo.get("efficientnet_lite0"))
        c0, t0 = time.process_time(), time.perf_counter()
        stats = run(graph, "EdgeRunner", edge=EdgeRunner(progress=False))
        total_cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        workers_cpu = decode_workers_cpu()
    n = len(paths)
    print(f"edge runner: {n / wall:.1f} images/s, process CPU {total_cpu / n * 1e3:.2f} ms/image "
          f"(+ decode workers {workers_cpu / n * 1e3:.2f}), scored {stats.scored} "
          f"(load average {os.getloadavg()[0]:.1f})")
    width = max([10, *map(len, stats.steps)])
    print(f"{'step':<{width}} {'thread CPU ms/img':>18} {'wall s':>8} {'waits in/out s':>15} {'batches':>8}")
    for name, m in stats.steps.items():
        print(f"{name:<{width}} {m.cpu_s / n * 1e3:18.2f} {m.wall_s:8.2f} {m.wait_in_s:7.2f}/{m.wait_out_s:<7.2f} "
              f"{m.batches:>8}")
    print(f"{'(other)':<{width}} {(total_cpu - sum(m.cpu_s for m in stats.steps.values())) / n * 1e3:18.2f}   "
          "(model loading, the runner between steps)")
    infer = next(s for s in graph.steps if s.op == "onnx_infer")
    bare = bare_costs(paths, str(zoo.onnx_path(zoo.get("efficientnet_lite0"))), infer.params["batch_size"])
    print("same work without beamzoo (one thread):")
    for k, v in bare.items():
        print(f"  {k:<48} {v:6.2f} ms/img")

    if args.cprofile:
        stages = EdgeRunner().compile(graph).stages  # as the runner compiled it (decode and resize fused)
        (source,) = next(s for s in stages if s.kind == "source").operators()
        chain = next(s for s in stages if any(st.op == "onnx_infer" for st in s.steps)).operators()
        head = chain[:[op.name for op in chain].index("onnx_infer")]
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

"""How fast a finished run resumes: every input already done, so nothing should be read.

    python bench/resume.py --n 100000            # prints one line per way of keying, --json for all

Makes N tiny JPEGs (24x24, about 1.4 kB each, in a temporary folder); for each
``--resume_by`` (``stat``, then ``content``) scores them once with a tiny
onnx.helper model through the real ``score_images`` graph on the edge runner
(keyed that way), then times a resume of that finished run. Each
resume reports inputs/s over the run call, the rows the read step saw (the
per-step metrics) and the bytes the process read (``rchar`` of
``/proc/self/io``: every read() call, page cache included) against the bytes
of the inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from beamzoo.pipeline import run, score_images
from beamzoo.runners.edge import EdgeRunner
from beamzoo.zoo import card_from_dict, sha256_of

READ = "classify/read"


def tiny_model(path: str):
    """[N,3,8,8] -> the mean of each channel, as logits of red, green, blue."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("ReduceMean", ["images"], ["logits"], axes=[2, 3], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return card_from_dict(dict(name="tiny", version="1", task="image-classification", file=path, sha256=sha256_of(path),
                               inputs=[dict(name="images", dtype="float32", shape=[3, 8, 8], layout="NCHW",
                                            channels="RGB", value_range=[-1, 1])],
                               outputs=[dict(name="logits", dtype="float32", shape=[3])],
                               labels=["red", "green", "blue"], preprocess=dict(resize=9, crop=8)),
                          "bench/resume.py tiny model", base=None)


def make_images(folder: str, n: int) -> int:
    """N tiny JPEGs in 100 subfolders (a few distinct ones, copied); their total bytes."""
    rng = np.random.default_rng(0)
    blobs = [cv2.imencode(".jpg", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))[1].tobytes() for _ in range(16)]
    total = 0
    for i in range(n):
        sub = os.path.join(folder, f"d{i % 100:02d}")
        if i < 100:
            os.makedirs(sub, exist_ok=True)
        data = blobs[i % len(blobs)]
        with open(os.path.join(sub, f"img{i:07d}.jpg"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def timed(graph, workers: int, **kw) -> dict:
    before_bytes, t0, c0 = rchar(), time.perf_counter(), time.process_time()
    stats = run(graph, "EdgeRunner", edge=EdgeRunner(workers=workers, progress=False), **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"inputs": stats.inputs, "scored": stats.scored, "skipped": stats.skipped, "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "inputs_per_s": round(stats.inputs / wall),
            "read_step_rows": stats.steps[READ].rows_in if READ in stats.steps else 0,
            "bytes_read": rchar() - before_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="inputs (default 100000)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="edge runner workers")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="beamzoo-resume-") as tmp:
        images, out = os.path.join(tmp, "images"), os.path.join(tmp, "out")
        input_bytes = make_images(images, args.n)
        card = tiny_model(os.path.join(tmp, "tiny.onnx"))
        results = {"n": args.n, "input_bytes": input_bytes}
        for by in ("stat", "content"):  # a run keyed each way, then its resume
            graph = score_images(os.path.join(images, "**", "*.jpg"), os.path.join(out, by), card, topk=1,
                                 isolate=False)
            first = results[f"first_{by}"] = timed(graph, args.workers, resume_by=by)
            print(f"first run (keys by {by}): {first['inputs']} inputs, {first['inputs_per_s']} inputs/s over "
                  f"{first['seconds']} s; the inputs hold {input_bytes} bytes")
            r = results[by] = timed(graph, args.workers, resume=True, resume_by=by)
            assert r["skipped"] == args.n and r["scored"] == 0, r
            print(f"resume --resume_by {by}: {r['inputs_per_s']} inputs/s over {r['seconds']} s "
                  f"(CPU {r['cpu_seconds']} s); the read step saw {r['read_step_rows']} rows; "
                  f"the process read {r['bytes_read']} bytes ({r['bytes_read'] / input_bytes:.2f} x the inputs')")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

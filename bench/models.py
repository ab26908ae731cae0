"""The built-in models side by side: top-1 agreement and speed on the benchmark images.

    python bench/models.py --n 500 --out bench/results/

For each EfficientNet-Lite card, fp32 and int8: top-1 agreement with the
largest fp32 model (Lite2) on the first N benchmark images, each image
preprocessed as its own card says (beamzoo's DecodeResize); milliseconds per
image on one core (one intra-op thread, batches of --batch, after warm-up,
the median over the batches of thread CPU time and of wall time); and for an
int8 model its agreement with its own fp32 model and its speed-up over it.
A variant's fp32 and int8 models run batch by batch in turn, so a change in
the machine's load weighs on both alike. Writes OUT/models-n{N}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images  # noqa: E402
from run import cpu_model, versions  # noqa: E402

VARIANTS = ("lite0", "lite1", "lite2")
REFERENCE = "efficientnet_lite2"


def card_names(variant: str) -> tuple[str, str]:
    return f"efficientnet_{variant}", f"efficientnet_{variant}_int8"


def pixels(paths: list[str], card) -> np.ndarray:
    """The images as the card's preprocessing makes them, in beamzoo's own step."""
    from beamzoo.transforms.preprocess import DecodeResize
    spec = card.input
    step = DecodeResize(resize=card.preprocess["resize"], crop=card.preprocess["crop"],
                        layout=spec.layout, channels=spec.channels, value_range=spec.value_range)
    return np.stack([step.process_row({"data": Path(p).read_bytes()})["pixels"] for p in paths])


def session(card):
    import onnxruntime as ort

    from beamzoo import zoo
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(zoo.model_bytes(card), so, providers=["CPUExecutionProvider"])


def run_pair(cards, x: np.ndarray, batch: int, warmup: int) -> dict:
    """Logits and per-batch times of each card's model on ``x``, the models taking turns."""
    sessions = [(c, session(c)) for c in cards]
    for c, s in sessions:
        for _ in range(warmup):
            s.run([c.output_name], {c.input_name: x[:batch]})
    out = {c.name: {"logits": [], "cpu_ms": [], "wall_ms": []} for c in cards}
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for c, s in sessions:
            w0, c0 = time.perf_counter(), time.thread_time()
            logits = s.run([c.output_name], {c.input_name: xb})[0]
            c1, w1 = time.thread_time(), time.perf_counter()
            r = out[c.name]
            r["logits"].append(logits)
            if len(xb) == batch:  # a short last batch is not timed
                r["cpu_ms"].append((c1 - c0) * 1000 / batch)
                r["wall_ms"].append((w1 - w0) * 1000 / batch)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="benchmark images (the first N of the set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per model first")
    p.add_argument("--cache", default=str(HERE / "cache"), help="where image sets are kept")
    p.add_argument("--out", default=None, help="folder for models-n{N}.json")
    args = p.parse_args(argv)

    from beamzoo import zoo
    from beamzoo.zoo.flops import count_flops

    # The 2000-image set of bench/run.py, reused when it is big enough.
    base = images.make_set(args.cache, max(args.n, 2000), args.seed)
    paths = images.image_paths(base)[:args.n]
    load = os.getloadavg()[0]
    print(f"N={len(paths)} batch={args.batch} one intra-op thread, {cpu_model()}, "
          f"load average before {load:.1f}", flush=True)

    rows = {}
    for v in VARIANTS:
        cards = [zoo.get(n) for n in card_names(v)]  # built and verified before any timing
        x = pixels(paths, cards[0])
        res = run_pair(cards, x, args.batch, args.warmup)
        for c in cards:
            logits = np.concatenate(res[c.name]["logits"])
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            rows[c.name] = {"card": c.ref, "input": c.preprocess["crop"], "resize": c.preprocess["resize"],
                            "gflops": count_flops(zoo.model_bytes(c)) / 1e9, "top1": logits.argmax(1),
                            "p_top1": prob.max(1), "cpu_ms": float(np.median(res[c.name]["cpu_ms"])),
                            "wall_ms": float(np.median(res[c.name]["wall_ms"])),
                            "batches_timed": len(res[c.name]["cpu_ms"])}
        print(f"  {v}: done", flush=True)

    ref = rows[REFERENCE]
    for name, r in rows.items():
        r["agree_lite2"] = float((r["top1"] == ref["top1"]).mean())
        if name.endswith("_int8"):
            own = rows[name[:-len("_int8")]]
            same = r["top1"] == own["top1"]
            sure = own["p_top1"] > 0.5
            r["agree_fp32"] = float(same.mean())
            r["agree_fp32_sure"] = float(same[sure].mean()) if sure.any() else None
            r["sure_fraction"] = float(sure.mean())
            r["speedup_cpu"] = own["cpu_ms"] / r["cpu_ms"]
            r["speedup_wall"] = own["wall_ms"] / r["wall_ms"]

    print(table(rows, len(paths)))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"n": len(paths), "seed": args.seed, "batch": args.batch, "cpu": cpu_model(),
                "load_average_before": load, "versions": versions(),
                "models": {k: {f: v for f, v in r.items() if f not in ("top1", "p_top1")}
                           for k, r in rows.items()}}
        path = out / f"models-n{len(paths)}.json"
        path.write_text(json.dumps(data, indent=2))
        print(f"wrote {path}")
    return 0


def table(rows: dict, n: int) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f} %"

    lines = ["| model | input / resize | GFLOPs | CPU ms/img | wall ms/img | top-1 = Lite2 fp32 "
             "| int8: top-1 = own fp32 (where fp32 p > 0.5) | int8 speed-up (CPU, wall) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        int8 = "agree_fp32" in r
        own = (f"{pct(r['agree_fp32'])} ({pct(r['agree_fp32_sure'])} of {round(r['sure_fraction'] * n)})"
               if int8 else "-")
        speed = f"{r['speedup_cpu']:.2f} x, {r['speedup_wall']:.2f} x" if int8 else "-"
        lines.append(f"| {r['card']} | {r['input']} / {r['resize']} | {r['gflops']:.2f} | {r['cpu_ms']:.2f} "
                     f"| {r['wall_ms']:.2f} | {pct(r['agree_lite2'])} | {own} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

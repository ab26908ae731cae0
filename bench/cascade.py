"""The cascade against its two models, side by side in one run, on the benchmark images.

    python bench/cascade.py --n 2000 --out bench/results/

Runs, one after another on the edge runner (score_images' graph, all cores):
the fast model alone, the strong model alone, then the cascade at each
``--thresholds`` and at the threshold that ``--agreement`` picks on a
calibration sample of ``--calibration`` images (as ``--escalate_agreement``
does). For each: images/s, the fraction escalated, and top-1 agreement with
the strong model run on every image. Writes OUT/cascade-n{N}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images  # noqa: E402
from run import cpu_model, versions  # noqa: E402


def labels(out: str) -> dict[str, dict]:
    import pyarrow.dataset as ds
    t = ds.dataset(os.path.join(out, "predictions"), format="parquet").to_table()
    return {r["id"]: r for r in t.to_pylist()}


def timed(pattern: str, out: str, fast, strong=None, below: float = 0.5) -> tuple[dict, dict]:
    """(rows by id, timing) of one run of score_images' graph: images/s (wall), CPU ms per
    image (every thread of this process: what the machine's load disturbs least), the load
    average before."""
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners.edge import EdgeRunner
    load = os.getloadavg()[0]
    graph = score_images(pattern, out, fast, escalate=strong, below=below, derived_only=True)
    cpu = time.process_time()
    stats = run(graph, "EdgeRunner", edge=EdgeRunner(progress=False))
    cpu = time.process_time() - cpu
    assert stats.failed == 0 and stats.scored == stats.inputs, stats
    return labels(out), {"images_per_s": stats.inputs / stats.seconds, "cpu_ms": 1000 * cpu / stats.inputs,
                         "load": load}


def best(times: list[dict]) -> dict:
    """The least disturbed of a configuration's rounds: the most images/s, the least CPU."""
    return {"images_per_s": max(t["images_per_s"] for t in times), "cpu_ms": min(t["cpu_ms"] for t in times),
            "load": max(t["load"] for t in times), "rounds": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--fast", default="efficientnet_lite0")
    p.add_argument("--strong", default="efficientnet_lite2")
    p.add_argument("--thresholds", default="0.2,0.35,0.5,0.7")
    p.add_argument("--agreement", type=float, default=0.98)
    p.add_argument("--calibration", type=int, default=200)
    p.add_argument("--repeat", type=int, default=2, help="rounds of every configuration")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT images (a quick look)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    from beamzoo import zoo
    from beamzoo.cascade import choose_threshold, outcomes
    fast, strong = zoo.get(args.fast), zoo.get(args.strong)
    folder = images.set_dir(args.cache, args.n, args.seed)
    paths = images.image_paths(folder) if folder.exists() else images.image_paths(
        images.make_set(args.cache, args.n, args.seed))
    tmp = tempfile.mkdtemp(prefix="bench-cascade-")
    pattern = str(folder / "*.jpg")
    if args.limit:
        paths = paths[:args.limit]
        os.makedirs(f"{tmp}/images")
        for f in paths:
            os.symlink(f, f"{tmp}/images/{os.path.basename(f)}")
        pattern = f"{tmp}/images/*.jpg"
    rows = []
    for f in paths:  # the files in the page cache, so the first run does not pay for the disk
        Path(f).read_bytes()
    warm = f"{tmp}/warm"  # load both models (sessions are kept per process) before any timed run
    os.makedirs(warm)
    for f in paths[:8]:
        os.symlink(f, f"{warm}/{os.path.basename(f)}")
    timed(f"{warm}/*.jpg", f"{tmp}/warm-out", fast, strong, 1.0)

    t0 = time.perf_counter()
    choice = choose_threshold(fast, strong, paths, args.agreement, n=args.calibration, seed=args.seed)
    calibration_s = time.perf_counter() - t0
    # (name, the model every image sees, the strong model or None, the threshold)
    configs = [(f"{fast.ref} alone", fast, None, None), (f"{strong.ref} alone", strong, None, None)]
    configs += [(f"cascade below {float(t):g}", fast, strong, float(t)) for t in args.thresholds.split(",")]
    configs.append((f"cascade, {args.agreement:g} target ({args.calibration} calibr.)", fast, strong,
                    choice.threshold))
    answers, times = {}, {c[0]: [] for c in configs}
    for r in range(args.repeat):  # rounds of every configuration in turn: a change of load weighs on all
        for i, (name, first, second, t) in enumerate(configs):
            out = f"{tmp}/r{r}-{i}"
            got, timing = timed(pattern, out, first, second, 0.5 if t is None else t)
            answers.setdefault(name, got)
            times[name].append(timing)
            shutil.rmtree(out)
    truth_rows = answers[configs[1][0]]
    ids = sorted(truth_rows)
    truth = [truth_rows[i]["label"] for i in ids]
    f_rows = answers[configs[0][0]]
    f_scores, f_labels = [f_rows[i]["score"] for i in ids], [f_rows[i]["label"] for i in ids]
    for name, first, second, t in configs:
        got = answers[name]
        up = (sum(got[k]["escalation"] == "escalated" for k in ids) / len(ids) if second else
              float(first is strong))
        agree = sum(got[k]["label"] == y for k, y in zip(ids, truth)) / len(ids)
        row = dict(run=name, threshold=t, escalated=up, agreement=agree, **best(times[name]))
        if t is not None:  # what the single runs say it should be
            row["predicted_escalated"], row["predicted_agreement"] = outcomes(f_scores, f_labels, truth, t)
        rows.append(row)
    s_speed = rows[1]["images_per_s"]
    s_cpu = rows[1]["cpu_ms"]

    print(f"N={len(ids)} seed={args.seed} cores={len(os.sched_getaffinity(0))} ({cpu_model()}), EdgeRunner")
    print(f"best of {args.repeat} rounds; load: the highest load average before a round's run")
    print(f"{'run':<40}{'threshold':>10}{'escalated':>10}{'agrees':>8}{'images/s':>10}{'x strong':>9}"
          f"{'CPU ms/img':>11}{'x strong':>9}{'load':>6}")
    print("-" * 113)
    for r in rows:
        t = "" if r["threshold"] is None else f"{r['threshold']:.4f}"
        print(f"{r['run']:<40}{t:>10}{r['escalated']:>10.1%}{r['agreement']:>8.1%}{r['images_per_s']:>10.1f}"
              f"{r['images_per_s'] / s_speed:>9.2f}{r['cpu_ms']:>11.1f}{r['cpu_ms'] / s_cpu:>9.2f}{r['load']:>6.1f}")
    print(f"calibration: {choice.line(strong.ref, args.agreement)} ({calibration_s:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    result = {"n": len(ids), "seed": args.seed, "repeat": args.repeat, "fast": fast.ref, "strong": strong.ref, "rows": rows,
              "calibration": {"threshold": choice.threshold, "sample": choice.rows, "seconds": calibration_s,
                              "sample_escalated": choice.escalated, "sample_agreement": choice.agreement},
              "cpu": cpu_model(), "versions": versions()}
    path = Path(args.out) / f"cascade-n{len(ids)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def timed(pattern: str, out: str, fast, strong=None, below: float = 0.5) -> tuple[dict, float, float]:
    """(rows by id, images/s, load average before) of one run of score_images' graph."""
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners import EdgeRunner
    load = os.getloadavg()[0]
    graph = score_images(pattern, out, fast, escalate=strong, escalate_below=below, derived_only=True)
    stats = run(graph, "EdgeRunner", edge=EdgeRunner(progress=False))
    assert stats.failed == 0 and stats.scored == stats.inputs, stats
    return labels(out), stats.inputs / stats.seconds, load


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
    warm = f"{tmp}/warm"  # load both models (sessions are kept per process) before any timed run
    os.makedirs(warm)
    for f in paths[:8]:
        os.symlink(f, f"{warm}/{os.path.basename(f)}")
    timed(f"{warm}/*.jpg", f"{tmp}/warm-out", fast, strong, 1.0)

    f_rows, f_speed, f_load = timed(pattern, f"{tmp}/fast", fast)
    s_rows, s_speed, s_load = timed(pattern, f"{tmp}/strong", strong)
    ids = sorted(s_rows)
    truth = [s_rows[i]["label"] for i in ids]
    f_scores, f_labels = [f_rows[i]["score"] for i in ids], [f_rows[i]["label"] for i in ids]
    rows.append(dict(run=f"{fast.ref} alone", threshold=None, escalated=0.0,
                     agreement=outcomes(f_scores, f_labels, truth, 0.0)[1], images_per_s=f_speed, load=f_load))
    rows.append(dict(run=f"{strong.ref} alone", threshold=None, escalated=1.0, agreement=1.0,
                     images_per_s=s_speed, load=s_load))

    t0 = time.perf_counter()
    choice = choose_threshold(fast, strong, paths, args.agreement, n=args.calibration, seed=args.seed)
    calibration_s = time.perf_counter() - t0
    runs = [(float(t), f"cascade below {float(t):g}") for t in args.thresholds.split(",")]
    runs.append((choice.threshold, f"cascade, {args.agreement:g} target ({args.calibration} calibr.)"))
    for i, (t, name) in enumerate(runs):
        c_rows, speed, load = timed(pattern, f"{tmp}/cascade{i}", fast, strong, t)
        answers = [c_rows[k]["label"] for k in ids]
        up = sum(c_rows[k]["escalation"] == "escalated" for k in ids) / len(ids)
        agree = sum(a == b for a, b in zip(answers, truth)) / len(ids)
        predicted = outcomes(f_scores, f_labels, truth, t)  # what the single runs say it should be
        rows.append(dict(run=name, threshold=t, escalated=up, agreement=agree, images_per_s=speed, load=load,
                         predicted_escalated=predicted[0], predicted_agreement=predicted[1]))

    print(f"N={len(ids)} seed={args.seed} cores={len(os.sched_getaffinity(0))} ({cpu_model()}), EdgeRunner")
    print(f"{'run':<44}{'threshold':>10}{'escalated':>11}{'agrees':>9}{'images/s':>10}"
          f"{'x strong':>10}{'load':>6}")
    print("-" * 100)
    for r in rows:
        t = "" if r["threshold"] is None else f"{r['threshold']:.4f}"
        print(f"{r['run']:<44}{t:>10}{r['escalated']:>10.1%}{r['agreement']:>9.1%}{r['images_per_s']:>10.1f}"
              f"{r['images_per_s'] / s_speed:>10.2f}{r['load']:>6.1f}")
    print(f"calibration: {choice.line(strong.ref, args.agreement)} ({calibration_s:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    result = {"n": len(ids), "seed": args.seed, "fast": fast.ref, "strong": strong.ref, "rows": rows,
              "calibration": {"threshold": choice.threshold, "sample": choice.rows, "seconds": calibration_s,
                              "sample_escalated": choice.escalated, "sample_agreement": choice.agreement},
              "cpu": cpu_model(), "versions": versions()}
    path = Path(args.out) / f"cascade-n{len(ids)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""beamzoo benchmark: one command, one table.

    python bench/run.py --n 2000 --out bench/results/
    python bench/run.py --n 2000 --repeat 3 --rss-scaling --out bench/results/   # as in README

Makes (or reuses) a seeded image set, then runs each contender on the same
files, one after another, each in a fresh child process, and prints one table
(images/s, ratio to the limit, peak RSS, time to first result, top-1 agreement
with the reference loop). Writes OUT/results-n{N}.json. See bench/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["limit", "reference", "beam_stock", "beamzoo_edge", "beamzoo_edge_inproc", "beamzoo_direct",
         "beamzoo_flink", "ray_data"]
TITLES = {"limit": "limit (stages alone)", "reference": "reference loop (ORT+OpenCV)",
          "beam_stock": "Beam stock RunInference", "beamzoo_edge": "beamzoo EdgeRunner",
          "beamzoo_edge_inproc": "EdgeRunner, no isolation",
          "beamzoo_direct": "beamzoo DirectRunner", "beamzoo_flink": "beamzoo FlinkRunner",
          "ray_data": "Ray Data map_batches"}
DROP_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def cores() -> int:
    return len(os.sched_getaffinity(0))


# ---- child side --------------------------------------------------------------

def child(argv) -> int:
    """Runs one contender; writes its result JSON (argv: name, ctx-json, result-path)."""
    import contenders
    name, ctx_json, result_path = argv
    ctx = contenders.Ctx(**json.loads(ctx_json))
    res = contenders.CONTENDERS[name](ctx)
    if res.get("seconds"):
        res["images_per_s"] = len(ctx.paths) / res["seconds"]
    with open("/proc/self/status") as f:
        res["vmhwm_mib"] = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    Path(result_path).write_text(json.dumps(res))
    return 0


# ---- parent side -------------------------------------------------------------

def spawn(name: str, ctx, log_dir: str) -> dict:
    """Run ``name`` in a fresh process; add its peak RSS (from wait4) to its result."""
    result_path = os.path.join(log_dir, f"{name}.json")
    log_path = os.path.join(log_dir, f"{name}.log")
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    load = os.getloadavg()[0]
    cmd = [sys.executable, str(HERE / "run.py"), "--child", name, json.dumps(asdict(ctx)), result_path]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(result_path):
        tail = Path(log_path).read_text()[-3000:]
        return {"error": f"exit code {proc.returncode}", "log_tail": tail}
    res = json.loads(Path(result_path).read_text())
    # KiB on Linux; a contender whose work runs in processes not waited for (Ray) reports its own
    res["peak_rss_mib"] = res.get("peak_rss_mib") or usage.ru_maxrss / 1024
    res["process_s"] = elapsed
    res["load_average_before"] = load  # other work on the machine skews wall-clock numbers
    res["process_cpu_s"] = usage.ru_utime + usage.ru_stime  # whole child, imports included
    return res


def best_run(runs: list[dict]) -> dict:
    """The fastest successful run; peak RSS is the highest over all runs."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(max(ok, key=lambda r: r.get("images_per_s") or 0))
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ok)
    best["runs_images_per_s"] = [r.get("images_per_s") for r in ok]
    return best


def warm_cache(paths: list[str]) -> None:
    """Read every file once so all contenders start with the same (warm) page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def agreement(results: dict, base: str = "reference") -> dict:
    ref = results.get(base, {}).get("labels") or {}
    out = {}
    for name, res in results.items():
        labels = res.get("labels") or {}
        common = [k for k in ref if k in labels]
        if ref and labels and name != base:
            out[name] = {"files": len(common),
                         "agree": sum(ref[k] == labels[k] for k in common) / max(1, len(common))}
    with_labels = [r["labels"] for r in results.values() if r.get("labels")]
    if len(with_labels) > 1:
        keys = set.intersection(*(set(lab) for lab in with_labels))
        out["all"] = {"files": len(keys), "agree": sum(
            len({lab[k] for lab in with_labels}) == 1 for k in keys) / max(1, len(keys))}
    return out


def fmt(v, spec, none="n/a"):
    return none if v is None else format(v, spec)


def cpu_ms(res: dict, n: int):
    if res.get("cpu_s_per_image"):
        return res["cpu_s_per_image"] * 1e3
    return res["cpu_s"] / n * 1e3 if res.get("cpu_s") else None


def table(results: dict, agree: dict, n: int) -> str:
    limit = results.get("limit", {}).get("images_per_s")
    head = (f"{'contender':<30} {'images/s':>9} {'x limit':>8} {'CPU ms/img':>11} {'peak RSS MiB':>13} "
            f"{'first result s':>15} {'top-1 = ref':>12}")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        if "error" in res or "skipped" in res:
            lines.append(f"{TITLES.get(name, name):<30} {res.get('skipped') or 'FAILED: ' + res['error']}")
            continue
        ips = res.get("images_per_s")
        ratio = ips / limit if ips and limit else None
        rss = None if name == "limit" else res.get("peak_rss_mib")
        ag = "(base)" if name == "reference" else fmt(agree.get(name, {}).get("agree"), ".4f")
        lines.append(f"{TITLES.get(name, name):<30} {fmt(ips, '9.1f'):>9} {fmt(ratio, '8.2f'):>8} "
                     f"{fmt(cpu_ms(res, n), '11.2f'):>11} "
                     f"{fmt(rss, '13.0f'):>13} {fmt(res.get('first_result_s'), '15.2f'):>15} {ag:>12}")
    if "all" in agree:
        lines.append(f"all contenders with labels agree on top-1 for {agree['all']['agree']:.4f} "
                     f"of {agree['all']['files']} files")
    return "\n".join(lines)


SHORT = {"limit": "limit", "reference": "reference", "beam_stock": "Beam stock", "beamzoo_edge": "edge",
         "beamzoo_edge_inproc": "edge, no isolation", "beamzoo_direct": "beamzoo DirectRunner",
         "beamzoo_flink": "beamzoo FlinkRunner", "ray_data": "Ray Data"}


def targets(results: dict, rss: dict | None) -> list[dict]:
    def ips(name):
        r = results.get(name, {})
        return r.get("images_per_s") if "error" not in r else None

    def rounds(name):
        r = results.get(name, {})
        return r.get("runs_images_per_s") or [] if "error" not in r else []

    checks = []

    def check(num, den, goal):
        a, b = ips(num), ips(den)
        value = a / b if a and b else None
        # the same ratio round by round: each round runs every contender back to back, so a
        # round's ratio shares that round's load; the best-of ratio pairs different rounds
        paired = [x / y for x, y in zip(rounds(num), rounds(den)) if x and y]
        if len(paired) != len(rounds(num)) or len(paired) < 2:
            paired = []
        checks.append({"target": f"{SHORT[num]} / {SHORT[den]}", "goal": goal, "value": value,
                       "pass": None if value is None else value >= goal,
                       "by_round": [round(x, 3) for x in paired]})

    check("beamzoo_edge", "limit", 0.85)
    check("beamzoo_edge_inproc", "limit", 0.85)
    check("beamzoo_edge", "beamzoo_edge_inproc", 0.9)
    check("beamzoo_edge", "reference", 1.0)
    check("beamzoo_direct", "beam_stock", 2.0)
    check("beamzoo_flink", "limit", 0.5)
    check("beamzoo_edge", "ray_data", 1.0)
    if rss and rss.get("growth_pct") is not None:
        checks.append({"target": "edge RSS growth %", "goal": "< 10", "value": rss["growth_pct"],
                       "pass": rss["growth_pct"] < 10})
    return checks


def step_lines(results: dict, n: int) -> str:
    """Where beamzoo's time goes, per step of the compiled graph (its run's per-step metrics): CPU
    ms per image in the step's own thread, and the step's share of the steps' wall time."""
    out = []
    for name, res in results.items():
        steps = res.get("steps") if "error" not in res else None
        if not steps:
            continue
        wall = sum(s["wall_s"] for s in steps.values()) or 1.0
        out.append(f"{TITLES.get(name, name)}, per step (CPU ms/img in the step's thread, share of step wall time):")
        for sid, s in sorted(steps.items(), key=lambda kv: -kv[1]["wall_s"]):
            if s["batches"]:
                out.append(f"  {sid:<34} {s['cpu_s'] / n * 1e3:8.2f} ms  {s['wall_s'] / wall:6.1%}  "
                           f"rows {s['rows_in']}  batches {s['batches']}")
    return "\n".join(out)


def target_lines(checks: list[dict]) -> str:
    out = ["targets:"]
    for c in checks:
        verdict = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        goal = c["goal"] if isinstance(c["goal"], str) else f">= {c['goal']}"
        by = c.get("by_round") or []
        rounds = f"  round by round {min(by):.2f}-{max(by):.2f}, median {statistics.median(by):.2f}" if by else ""
        out.append(f"  {c['target']:<36} {fmt(c['value'], '.2f'):>8}  (goal {goal})  {verdict}{rounds}")
    return "\n".join(out)


def rss_scaling(ctx_for, base_dir: Path, n: int, big: int, log_dir: str) -> dict:
    import images
    big_dir = images.make_cyclic(base_dir, big)
    warm_cache(images.image_paths(base_dir))
    out = {}
    for label, directory, count in (("small", base_dir, n), ("big", big_dir, big)):
        print(f"rss-scaling: beamzoo_edge on {count} files ...", flush=True)
        res = spawn("beamzoo_edge", ctx_for(directory, f"rss-{label}"), log_dir)
        out[label] = {"n": count, "peak_rss_mib": res.get("peak_rss_mib"),
                      "images_per_s": res.get("images_per_s"), "error": res.get("error")}
    s, b = out["small"]["peak_rss_mib"], out["big"]["peak_rss_mib"]
    out["growth_pct"] = (b - s) / s * 100 if s and b else None
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    p.add_argument("--cache", default=str(HERE / "cache"), help="where image sets are kept")
    p.add_argument("--only", nargs="+", choices=ORDER, help="run only these")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every contender this many times, round-robin; report each one's best run")
    p.add_argument("--limit-sample", type=int, default=512, help="images the limit's stages are timed on")
    p.add_argument("--ref-threads", type=int, default=0,
                   help="reference loop: onnxruntime intra-op threads (0: onnxruntime's default, all cores)")
    p.add_argument("--no-flink", action="store_true",
                   help="leave out beamzoo on FlinkRunner (it needs Java; the first run fetches the job server)")
    p.add_argument("--flink-master", default="[local]",
                   help="'[local]' (embedded Flink) or host:port of a cluster from `beamzoo flink up`")
    p.add_argument("--rss-scaling", action="store_true",
                   help="also measure the edge runner's peak RSS at N vs --rss-n files")
    p.add_argument("--rss-n", type=int, default=None, help="big N for --rss-scaling (default 10 x N)")
    args = p.parse_args(argv)

    import contenders
    import images
    from beamzoo import zoo

    card = zoo.get("efficientnet_lite0")
    model = str(zoo.onnx_path(card))  # built and cached before any timing
    base_dir = images.make_set(args.cache, args.n, args.seed)
    paths = images.image_paths(base_dir)
    warm_cache(paths)
    os.makedirs(args.out, exist_ok=True)
    load_start = os.getloadavg()[0]

    names = list(args.only or ORDER)

    results, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="beamzoo-bench-") as tmp:
        labels = os.path.join(tmp, "labels.txt")  # the card's labels, for the contenders that are not beamzoo
        Path(labels).write_text("\n".join(card.labels) + "\n", encoding="utf-8")

        def ctx_for(directory, tag):
            return contenders.Ctx(files=str(directory), work=os.path.join(tmp, tag), model=model,
                                  labels=labels, cores=cores(), limit_sample=args.limit_sample,
                                  ref_threads=args.ref_threads, flink_master=args.flink_master)

        if "beamzoo_flink" in names and args.no_flink:
            results["beamzoo_flink"] = {"skipped": "skipped (--no-flink)"}
        elif "beamzoo_flink" in names and shutil.which("java") is None:
            results["beamzoo_flink"] = {"skipped": "skipped: no `java` on PATH (FlinkRunner needs Java 17)"}
        if "ray_data" in names and importlib.util.find_spec("ray") is None:
            results["ray_data"] = {"skipped": "skipped: ray is not installed (pip install -e '.[bench-ray]')"}
        todo = [name for name in names if name not in results]
        for r in range(args.repeat):
            for name in todo:
                print(f"[{r + 1}/{args.repeat}] {name} on {len(paths)} images (load average "
                      f"{os.getloadavg()[0]:.1f}) ...", flush=True)
                res = spawn(name, ctx_for(base_dir, f"{name}-{r}"), tmp)
                runs.setdefault(name, []).append(res)
                if "error" in res:
                    print(f"{name} FAILED ({res['error']}):\n{res['log_tail']}", flush=True)
                else:
                    print(f"  {fmt(res.get('images_per_s'), '.1f')} images/s, peak RSS "
                          f"{res['peak_rss_mib']:.0f} MiB", flush=True)
        for name in todo:
            results[name] = best_run(runs[name])
        results = {name: results[name] for name in names}
        rss = rss_scaling(ctx_for, base_dir, args.n, args.rss_n or 10 * args.n, tmp) if args.rss_scaling else None

    agree = agreement(results)
    checks = targets(results, rss)
    print()
    print(f"N={args.n} seed={args.seed} repeat={args.repeat} cores={cores()} ({cpu_model()}), "
          f"load average before the runs {load_start:.1f}")
    print(table(results, agree, args.n))
    if rss:
        print(f"edge peak RSS: {fmt(rss['small']['peak_rss_mib'], '.0f')} MiB at N={rss['small']['n']}, "
              f"{fmt(rss['big']['peak_rss_mib'], '.0f')} MiB at N={rss['big']['n']}: "
              f"growth {fmt(rss['growth_pct'], '+.1f')}%")
    print(target_lines(checks))
    print(step_lines(results, args.n))

    for res in results.values():
        res.pop("labels", None)
    report = {"n": args.n, "seed": args.seed, "repeat": args.repeat, "images": str(base_dir),
              "cores": cores(), "cpu": cpu_model(), "load_average_before": load_start, "python": platform.python_version(), "versions": versions(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results, "agreement": agree,
              "rss_scaling": rss, "targets": checks}
    path = Path(args.out) / f"results-n{args.n}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("beamzoo", "apache-beam", "onnxruntime", "opencv-python-headless", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    sys.exit(main())

"""`beamzoo tune` measured: its choice against an exhaustive grid, the defaults and a hill-climb.

    python bench/tune.py --n 120 --sample 60 --out bench/results/

Three targets on the benchmark images (bench/images.py), each a sample of --sample of them:
a throughput (``throughput>=R``), a latency at a request rate (``latency_p95<=T`` with
``--serve --rate R``) and an agreement with the reference model (``agreement>=F``). For
each, four methods choose a configuration:

- tuner: ``beamzoo tune`` as shipped (``beamzoo.tune.search.tune``), over its whole space;
- grid: every configuration of the grid space run on the sample; the cheapest that met it;
- defaults: the command line's configuration (nothing searched);
- hill-climb (as Model Analyzer's quick mode): from the defaults, to the best neighbour in
  the grid space that is closer to the target, or meets it and is cheaper; it stops where
  no neighbour is. Its runs are the grid's (the seconds they took are counted once each).

The grid space is the tuner's, cut so that a grid can be measured (see GRID below):
every model with every value of every knob, cascades at three of the tuner's thresholds
with the speed knobs at their defaults but workers, and for serving three values of
max_batch and of max_delay_ms. ``beamzoo tune`` cannot be told to search less than its
whole space, so it searches a superset of the grid's.

Then every choice is run once more on the sample (the verification run): its cost, its
throughput, latency and agreement, and whether it met the target. The goal: the tuner's
cost within 10 % of the grid's best at no more than a quarter of the grid's measuring
time, every target met in verification. Writes OUT/tune.json and OUT/tune.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images  # noqa: E402
from run import cpu_model, versions  # noqa: E402

# the grid space: what of the tuner's space it keeps
GRID = {"serve": {"max_batch": (1, 4, 16), "max_delay_ms": (0.0, 5.0, 20.0)},
        "cascade_deciles": (2, 5, 8),  # of the nine thresholds the tuner tries for each pair
        "cascade_knobs": ("workers",)}  # a cascade's knobs in the grid; the others at their defaults
METHODS = ("tuner", "grid", "defaults", "hill-climb")
GOAL_COST, GOAL_TIME = 1.10, 0.25  # the tuner's cost / the grid's best; its measuring time / the grid's


def key(config: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in config.items() if v is not None))


@dataclass
class Measured:
    config: dict
    values: dict
    seconds: float  # measuring seconds of this run (its warm-up included)
    answers: dict = field(default_factory=dict, repr=False)


class Grid:
    """One job's measured configurations, each run once (``beamzoo.tune.measure.run_config``)."""

    def __init__(self, job):
        from beamzoo.tune import space
        from beamzoo.tune.search import models_of, space_of
        self.job = job
        self.models, self.dims = space_of(job)
        job.reference = job.reference or models_of(job)[1]
        self.defaults = {**job.graph.base(), **space.defaults(self.dims)}
        self.runs: dict[tuple, Measured] = {}
        self.setup_s = 0.0

    def start(self) -> None:
        """The reference's answers, and the first run's warm-up of the whole sample."""
        before = self.job.measuring_s
        self.job.measure(self.defaults)
        self.setup_s = self.job.measuring_s - before

    def measure(self, config: dict) -> Measured:
        from beamzoo.tune.measure import run_config
        k = key(config)
        if k not in self.runs:
            before = self.job.measuring_s
            run = run_config(self.job, config, self.job.reference_answers)
            self.runs[k] = Measured(config, run.values, self.job.measuring_s - before, run.answers)
        return self.runs[k]

    @property
    def measuring_s(self) -> float:
        return self.setup_s + sum(m.seconds for m in self.runs.values())


def restrict(dims: list, limits: dict) -> list:
    """``dims`` with only the values ``limits`` (flag -> values) keeps."""
    out = []
    for d in dims:
        if d.flag in limits:
            keep = tuple(v for v in d.values if any(_same(v, t) for t in limits[d.flag]))
            if not keep:
                raise SystemExit(f"--limit {d.flag}: none of {','.join(map(str, limits[d.flag]))} is one of its "
                                 f"values ({','.join(map(str, d.values))})")
            d = replace(d, values=keep)
        out.append(d)
    return out


def _same(value, text) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(text) == value
        except (TypeError, ValueError):
            return False
    return str(value) == str(text)


def batch_grid(grid: Grid, limits: dict, deciles: tuple, log) -> tuple[list, list]:
    """Measure the batch graph's grid: every model at every combination of the (limited) knobs,
    then cascades of every pair at ``deciles`` of the thresholds the tuner tries, their knobs at
    the defaults but ``GRID['cascade_knobs']``. Returns (models, dims) of the grid space."""
    from beamzoo.tune.search import configurations, thresholds
    from beamzoo.tune.space import Models, cascades, grid as combos
    dims = restrict(grid.dims, limits)
    _measure_all(grid, list(configurations(grid.models, dims)), "single models", log)
    models = list(grid.models)
    if len(models) > 1 and deciles:
        def cost(m):  # as the tuner orders them: its profile runs each model at the defaults, one worker
            one = grid.runs.get(key({**grid.defaults, **m.knobs(), "workers": 1}))
            return (one or grid.measure({**grid.defaults, **m.knobs()})).values["cost"]
        by_cost = [m.model for m in sorted(models, key=cost)]

        def tried(fast):
            ts = thresholds(grid.measure({**grid.defaults, "model": fast}).answers, grid.job.cores)
            return tuple(sorted({ts[min(i - 1, len(ts) - 1)] for i in deciles})) if ts else ()
        pairs = cascades(by_cost, tried)
        varied = [d for d in dims if d.flag in GRID["cascade_knobs"]]
        fixed = {d.flag: d.default if d.default in d.values else d.values[0] for d in dims if d not in varied}
        configs = [{**m.knobs(), **fixed, **v} for m in pairs for v in combos(varied)]
        _measure_all(grid, configs, "cascades", log)
        models += pairs
    return models, dims


def serve_grid(grid: Grid, limits: dict, log) -> tuple[list, list]:
    from beamzoo.tune.search import configurations
    dims = restrict(grid.dims, {**GRID["serve"], **limits})
    _measure_all(grid, list(configurations(grid.models, dims)), "served", log)
    return list(grid.models), dims


def _measure_all(grid: Grid, configs: list[dict], what: str, log) -> None:
    t0 = time.perf_counter()
    for i, c in enumerate(configs):
        grid.measure(c)
        if (i + 1) % 50 == 0 or i + 1 == len(configs):
            log(f"  grid, {what}: {i + 1}/{len(configs)} ({time.perf_counter() - t0:.0f} s)")


# ------------------------------------------------------------------ choosing

def shortfall(values: dict, targets: list) -> float:
    """How far ``values`` are from meeting every target, relative to each (0: they meet them)."""
    gap = 0.0
    for t in targets:
        v = values.get(t.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.inf
        gap += max(0.0, (t.value - v) / t.value if t.op == ">=" else (v - t.value) / t.value)
    return gap


def grid_best(grid: Grid, targets: list) -> Measured | None:
    from beamzoo.tune.search import meets
    ok = [m for m in grid.runs.values() if meets(m.values, targets)]
    return min(ok, key=lambda m: m.values["cost"]) if ok else None


def hill_climb(grid: Grid, models: list, dims: list, targets: list) -> tuple[Measured, float, int]:
    """(where it stopped, its measuring seconds, the configurations it ran): from the defaults,
    each step to the best neighbour (least short of the targets, then the cheapest) if it is
    better than here; neighbours outside the grid space are not taken."""
    from beamzoo.tune.search import neighbours_of
    allowed = set(grid.runs)

    def score(m):
        return shortfall(m.values, targets), m.values["cost"]
    here = grid.measure(grid.defaults)
    seen = {key(grid.defaults)}
    while True:
        step = [n for n in neighbours_of(here.config, models, dims) if key(n) in allowed and key(n) not in seen]
        seen |= {key(n) for n in step}
        if not step:
            break
        best = min((grid.measure(n) for n in step), key=score)
        if score(best) >= score(here):
            break
        here = best
    seconds = grid.setup_s + sum(grid.runs[k].seconds for k in seen if k in grid.runs)
    return here, seconds, len(seen)


def run_tuner(argv: list[str], log) -> dict:
    """``beamzoo tune`` on the command line ``argv``: what it chose, its measuring and wall seconds."""
    from beamzoo.tune.command import job_of
    from beamzoo.tune.search import tune
    said = []
    job = job_of(argv, say=said.append)
    try:
        t0 = time.perf_counter()
        result = tune(job)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
    runs = sum(line.startswith(("measured ", "verified ", "served ")) for line in said)
    chosen = result.chosen
    log(f"  tuner: {len(result.points)} configurations predicted, {runs} runs, {result.measuring_s:.1f} s measuring"
        f"{'; ' + result.infeasible if result.infeasible else ''}")
    return {"config": chosen.config if chosen else None, "predicted": chosen.predicted if chosen else None,
            "measured": chosen.measured if chosen else None, "measuring_s": result.measuring_s, "wall_s": wall,
            "runs": runs, "space": len(result.points), "infeasible": result.infeasible}


# ------------------------------------------------------------------ one target

@dataclass
class Case:
    name: str  # throughput | latency | agreement
    target: str  # as --target takes it
    serve: list  # ["--serve", "--rate", R] or []


def compare(case: Case, grid: Grid, space: tuple, tuner: dict) -> dict:
    """Every method's choice for ``case``, each run once more (its verification)."""
    from beamzoo.tune.result import parse_target
    from beamzoo.tune.search import meets
    targets = [parse_target(case.target)]
    models, dims = space
    best = grid_best(grid, targets)
    climbed, climb_s, climb_runs = hill_climb(grid, models, dims, targets)
    chosen = {"tuner": (tuner["config"], tuner["measuring_s"], tuner["runs"]),
              "grid": (best.config if best else None, grid.measuring_s, len(grid.runs)),
              "defaults": (grid.defaults, 0.0, 0),
              "hill-climb": (climbed.config, climb_s, climb_runs)}  # where it stopped, met or not
    rows = {}
    for method, (config, seconds, runs) in chosen.items():
        row = {"config": config, "measuring_s": seconds, "runs": runs}
        if config is not None:
            v = grid.job.measure(config)
            row.update(verified=_plain(v), met=meets(v, targets), searched=_plain(_search_values(method, config,
                                                                                               grid, tuner)))
        rows[method] = row
    for row in rows.values():
        base = rows["grid"].get("verified")
        if row.get("verified") and base:
            row["cost_vs_grid"] = row["verified"]["cost"] / base["cost"]
        if rows["grid"]["measuring_s"]:
            row["time_vs_grid"] = row["measuring_s"] / rows["grid"]["measuring_s"]
    t = rows["tuner"]
    goal = {"cost_vs_grid": t.get("cost_vs_grid"), "time_vs_grid": t.get("time_vs_grid"), "met": t.get("met", False)}
    goal["pass"] = bool(goal["met"] and goal["cost_vs_grid"] is not None and goal["cost_vs_grid"] <= GOAL_COST
                        and goal["time_vs_grid"] is not None and goal["time_vs_grid"] <= GOAL_TIME)
    return {"target": case.target, "serve": case.serve, "rows": rows, "goal": goal,
            "tuner": {k: tuner[k] for k in ("space", "wall_s", "infeasible", "predicted")},
            "grid_space": {"configurations": len(grid.runs), "dims": {d.flag: list(d.values) for d in dims},
                           "models": len(models)}}


def _search_values(method, config, grid, tuner):
    if method == "tuner":
        return tuner["measured"]
    m = grid.runs.get(key(config))
    return m.values if m else None


def _plain(values):
    return None if values is None else {k: v for k, v in values.items() if isinstance(v, (int, float, str))}


# ------------------------------------------------------------------ the table and the plot

def show(config: dict | None) -> str:
    if not config:
        return "none met it"
    short = {"model": "", "escalate": "-> ", "escalate_below": "below ", "batch_size": "batch ", "threads": "threads ",
             "workers": "workers ", "shrink": "", "max_batch": "max_batch ", "max_delay_ms": "delay "}
    return " ".join(f"{short.get(k, k + ' ')}{str(v).replace('efficientnet_', '').replace(':1', '')}"
                    for k, v in config.items() if v is not None)


def table(results: dict) -> str:
    head = ("| target | method | configuration | ms CPU/input | inputs/s | p95 ms | agreement | met | "
            "measuring s | cost / grid | time / grid |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 4 + "---|" + "---:|" * 3]
    for r in results.values():
        for method in METHODS:
            row = r["rows"][method]
            v = row.get("verified") or {}
            lines.append(f"| {r['target']}{' at ' + r['serve'][-1] + '/s' if r['serve'] else ''} | {method} | "
                         f"{show(row['config'])} | {_f(v.get('cost'), 1e3, '.2f')} | {_f(v.get('throughput'))} | "
                         f"{_f(v.get('latency_p95'), 1e3)} | {_f(v.get('agreement'), 1, '.3f')} | "
                         f"{'' if not v else 'yes' if row['met'] else 'NO'} | {row['measuring_s']:.1f} | "
                         f"{_f(row.get('cost_vs_grid'), 1, '.2f')} | {_f(row.get('time_vs_grid'), 1, '.3f')} |")
    return "\n".join(lines)


def _f(v, scale=1.0, spec=".1f") -> str:
    return "" if v is None else format(v * scale, spec)


def goal_lines(results: dict) -> str:
    out = []
    for r in results.values():
        g = r["goal"]
        out.append(f"{r['target']}: tuner cost / grid best {_f(g['cost_vs_grid'], 1, '.2f') or 'n/a'} "
                   f"(goal <= {GOAL_COST:.2f}), measuring time / grid {_f(g['time_vs_grid'], 1, '.3f') or 'n/a'} "
                   f"(goal <= {GOAL_TIME}), met in verification: {'yes' if g['met'] else 'no'} -> "
                   f"{'PASS' if g['pass'] else 'FAIL'}")
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    """Cost (verified) against measuring time, one panel per target, one mark per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fig = Figure(figsize=(4.2 * len(results), 3.8))
    FigureCanvasAgg(fig)
    marks = {"tuner": ("o", "tab:blue"), "grid": ("s", "tab:orange"), "hill-climb": ("^", "tab:green")}
    for i, r in enumerate(results.values()):
        ax = fig.add_subplot(1, len(results), i + 1)
        rows = r["rows"]
        for method, (marker, colour) in marks.items():
            v = rows[method].get("verified")
            if v and rows[method]["measuring_s"] > 0:
                ax.scatter([rows[method]["measuring_s"]], [v["cost"] * 1e3], marker=marker, s=60, label=method,
                           facecolors=colour if rows[method]["met"] else "none", edgecolors=colour)
        d = rows["defaults"].get("verified")
        if d:
            ax.axhline(d["cost"] * 1e3, color="grey", ls=":", label="defaults" + ("" if rows["defaults"]["met"]
                                                                                 else " (misses it)"))
        g = rows["grid"].get("verified")
        if g:
            ax.axhline(g["cost"] * 1e3 * GOAL_COST, color="tab:red", ls="--", lw=0.8, label="goal: cost, time")
            ax.axvline(rows["grid"]["measuring_s"] * GOAL_TIME, color="tab:red", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("measuring time, s (log)")
        ax.set_ylabel("ms CPU per input (verification run)")
        ax.set_title(r["target"] + (f" at {r['serve'][-1]}/s" if r["serve"] else ""), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("hollow: the target missed in the verification run", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ main

def limits_of(items: list[str]) -> dict:
    out = {}
    for item in items:
        flag, eq, values = item.partition("=")
        if not eq or not values:
            raise SystemExit(f"--limit {item}: write FLAG=V[,V...], e.g. batch_size=4,16")
        out[flag.strip()] = tuple(v.strip() for v in values.split(","))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=120, help="benchmark images made (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=60, help="inputs every measurement runs on (default 60)")
    p.add_argument("--cache", default=str(HERE / "cache"), help="where image sets are kept")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--targets", default="throughput,latency,agreement", help="which of the three to run")
    p.add_argument("--throughput", type=float, default=240.0, help="throughput>=R, inputs/s (default 240)")
    p.add_argument("--rate", type=float, default=50.0, help="requests/s for the latency target (default 50)")
    p.add_argument("--latency", type=float, default=0.03, help="latency_p95<=T at --rate, seconds (default 0.03)")
    p.add_argument("--agreement", type=float, default=0.85, help="agreement>=F with the reference (default 0.85)")
    p.add_argument("--model", help="the command line's model (default: beamzoo tune's)")
    p.add_argument("--zoo", action="append", default=[], metavar="DIR", help="a model repository, as beamzoo tune's")
    p.add_argument("--limit", action="append", default=[], metavar="FLAG=V,V",
                   help="keep only these values of a knob in the grid space (repeat)")
    p.add_argument("--cascade-deciles", default=",".join(map(str, GRID["cascade_deciles"])),
                   help="which of the tuner's nine thresholds the grid's cascades take ('' for none)")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in ("throughput", "latency", "agreement")]
    if unknown:
        raise SystemExit(f"--targets: {unknown[0]!r} is not one of throughput, latency, agreement")
    limits = limits_of(args.limit)
    deciles = tuple(int(d) for d in args.cascade_deciles.split(",") if d.strip())

    from beamzoo.tune.command import job_of
    base_dir = images.make_set(args.cache, args.n, args.seed)
    common = ["--input", str(base_dir / "*.jpg"), "--sample", str(args.sample)]
    common += [a for z in args.zoo for a in ("--zoo", z)] + (["--model", args.model] if args.model else [])
    cases = {"throughput": Case("throughput", f"throughput>={args.throughput:g}", []),
             "latency": Case("latency", f"latency_p95<={args.latency:g}", ["--serve", "--rate", f"{args.rate:g}"]),
             "agreement": Case("agreement", f"agreement>={args.agreement:g}", [])}
    os.makedirs(args.out, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    modes = {"serve" if cases[n].serve else "batch": cases[n].serve for n in names}
    grids, spaces, results = {}, {}, {}
    try:
        for mode, serve in modes.items():
            grids[mode] = Grid(job_of(common + serve, say=lambda line: None))
        known = {d.flag for g in grids.values() for d in g.dims}
        for flag in limits:
            if flag not in known:
                raise SystemExit(f"--limit {flag}: not a knob of the space (its knobs: {', '.join(sorted(known))})")
        for name in names:
            case = cases[name]
            mode = "serve" if case.serve else "batch"
            log(f"{case.target}{' at ' + str(args.rate) + '/s' if case.serve else ''}:")
            tuner = run_tuner(common + case.serve + ["--target", case.target], log)
            if mode not in spaces:
                grids[mode].start()
                spaces[mode] = (serve_grid(grids[mode], limits, log) if case.serve
                                else batch_grid(grids[mode], limits, deciles, log))
            results[name] = compare(case, grids[mode], spaces[mode], tuner)
    finally:
        for g in grids.values():
            shutil.rmtree(g.job.workdir, ignore_errors=True)
    total = time.perf_counter() - t_start

    print()
    print(f"N={args.n} sample={args.sample} seed={args.seed} cores={os.cpu_count()} ({cpu_model()}), load average "
          f"before {load_start:.1f}, {total:.0f} s in all")
    print(table(results))
    print(goal_lines(results))
    report = {"n": args.n, "sample": args.sample, "seed": args.seed, "images": str(base_dir), "cores": os.cpu_count(),
              "cpu": cpu_model(), "load_average_before": load_start, "versions": versions(), "total_s": total,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "grid_rule": {k: _jsonable(v) for k, v in GRID.items()},
              "limits": limits, "results": results,
              "grid_runs": {mode: [{"config": m.config, "values": _plain(m.values), "seconds": m.seconds}
                                   for m in g.runs.values()] for mode, g in grids.items()},
              "grid_setup_s": {mode: g.setup_s for mode, g in grids.items()}}
    Path(args.out, "tune.json").write_text(json.dumps(report, indent=1, default=str))
    if results:
        plot(results, os.path.join(args.out, "tune.png"))
    print(f"wrote {Path(args.out) / 'tune.json'} and tune.png")
    return 0


def _jsonable(v):
    return {k: list(x) for k, x in v.items()} if isinstance(v, dict) else list(v)


if __name__ == "__main__":
    sys.exit(main())

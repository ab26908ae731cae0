"""``beamzoo tune --report DIR``: what a tuning run found, as a page and plots to look at.

    README.md            the targets, the choice (its knobs; predicted against measured),
                         why nothing was chosen where nothing was, the frontier as a table
    cost_throughput.png  cost against throughput: every configuration predicted (faint), those
                         run (solid), the frontier, the targets as dashed lines, the choice
    cost_latency.png     the same against latency p95, where latencies were predicted
    step_share.png       each step's share of an input's time in the chosen configuration

Costs are shown per 1000 inputs (``core_s``: CPU-core milliseconds per input), latencies in
milliseconds. The plots are drawn with matplotlib's Agg canvas, never pyplot: writing a
report changes no global matplotlib state and needs no display.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np

from beamzoo.tune.result import METRICS, Point, Target, TuneResult

MARKDOWN = "README.md"
PLOTS = {"throughput": "cost_throughput.png", "latency_p95": "cost_latency.png"}
STEPS_PNG = "step_share.png"
CAPTIONS = {"cost_throughput.png": "cost against throughput", "cost_latency.png": "cost against latency p95",
            STEPS_PNG: "each step's share of an input's time"}
NAMES = (MARKDOWN, *PLOTS.values(), STEPS_PNG)  # a report's files: those not written this time are removed

# the plots' colours (the tests look for them in the pixels)
FEASIBLE = "#6baed6"  # predicted to meet every target (faint)
INFEASIBLE = "#bdbdbd"  # predicted to miss one (faint)
MEASURED = "#ff7f0e"  # run on the sample (solid)
FRONTIER = "#08519c"
TARGET = "#e7298a"
CHOSEN = "#d62728"

LOG_SPREAD = 10  # an axis whose values spread over more than this factor is drawn on a log scale
FRONTIER_ROWS = 40  # the Markdown frontier table shows at most this many rows
# metric -> (what it is, with its unit as shown, the factor from its value to the shown unit)
SHOWN = {"throughput": ("throughput (inputs/s)", 1), "latency_p95": ("latency p95 (ms per input)", 1000),
         "finish": ("finish (s for the whole --input)", 1), "agreement": ("agreement with the reference", 1),
         "core_s": ("CPU-core ms per input", 1000)}


def cost_unit(objective: str) -> str:
    """The cost axis's label: costs are per input, shown per 1000 (core seconds as core ms)."""
    return "CPU-core ms per input" if objective == "core_s" else "price per 1000 inputs"


def write_report(directory, result: TuneResult) -> list[Path]:
    """Write the report of ``result`` into ``directory`` (created if missing; its files are
    overwritten) and return the files written."""
    mpl = _matplotlib()
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--report {os.fspath(directory)}: is a file; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--report {os.fspath(directory)}: cannot create it ({exc.strerror or exc}); "
                         "give a directory that can be written") from None
    images = []
    for metric, name in PLOTS.items():
        if any(_finite(p.predicted.get(metric)) for p in result.points):
            _cost_plot(mpl, result, metric, out / name)
            images.append(name)
    if result.step_share:
        _step_plot(mpl, result, out / STEPS_PNG)
        images.append(STEPS_PNG)
    (out / MARKDOWN).write_text(markdown(result, images), encoding="utf-8")
    for name in NAMES:  # a plot an earlier report drew that this one has no data for
        if name != MARKDOWN and name not in images and (out / name).is_file():
            (out / name).unlink()
    return [out / MARKDOWN] + [out / name for name in images]


def frontier(points: list[Point], metric: str = "throughput", which: str = "predicted") -> list[Point]:
    """The points no other beats on both cost and ``metric`` (as ``TuneResult.frontier``, in one
    sort rather than pairwise; points whose value is missing or not finite are left out), cheapest first."""
    low = METRICS[metric][2]
    have = [(p, getattr(p, which)) for p in points if getattr(p, which)]
    have = [(p, v["cost"], v[metric]) for p, v in have if _finite(v.get("cost")) and _finite(v.get(metric))]
    have.sort(key=lambda t: (t[1], t[2] if low else -t[2]))
    out, best, last = [], None, None
    for p, c, v in have:
        if best is None or (v < best if low else v > best):
            out.append(p)
            best, last = v, (c, v)
        elif (c, v) == last:  # the same cost and value as the last kept: neither beats the other
            out.append(p)
    return out


# ------------------------------------------------------------------ the page

def markdown(result: TuneResult, images: list[str]) -> str:
    """The report's Markdown; ``images``: the PNG files beside it to embed."""
    chosen, unit = result.chosen, cost_unit(result.objective)
    run = sum(p.measured is not None for p in result.points)
    what = ("CPU-core seconds per input" if result.objective == "core_s"
            else "the price per input, from the core-hour prices of --costs")
    lines = ["# beamzoo tune report", "",
             f"**{'Chosen: ' + _knobs(chosen.config) if chosen else 'No configuration meets every target.'}**", "",
             f"{len(result.points)} configurations predicted and {run} run, on a sample of {result.sample} "
             f"inputs; measuring (the per-step profiles and the verification runs) took "
             f"{result.measuring_s:.1f} s. The objective is the lowest cost: {what} (shown as {unit}).", ""]
    lines += _targets(result)
    lines += _choice(result) if chosen else _no_choice(result)
    if result.step_share:
        lines += _steps(result)
    if images:
        lines += ["## Plots", ""]
        for name in images:
            lines += [f"![{CAPTIONS[name]}]({name})", ""]
    lines += _frontier(result)
    return "\n".join(lines)


def _targets(result: TuneResult) -> list[str]:
    chosen = result.chosen
    head = "chosen" if chosen else "best"
    lines = ["## Targets", "", f"| target | means | {head}, predicted | {head}, measured | "
             "configurations predicted to meet it |", "|---|---|---:|---:|---:|"]
    for t in result.targets:
        if chosen:
            pred, meas = chosen.predicted.get(t.metric), (chosen.measured or {}).get(t.metric)
            mark = "" if meas is None else (" (met)" if t.met(meas) else " (**missed**)")
        else:
            pred, meas, mark = _best(result.points, t.metric), _best(result.points, t.metric, "measured"), ""
        meeting = sum(t.met(p.predicted.get(t.metric)) for p in result.points)
        lines.append(f"| {_code(t.text)} | {_means(t)} | {_show(t.metric, pred)} | {_show(t.metric, meas)}{mark} | "
                     f"{meeting} of {len(result.points)} |")
    if not result.targets:
        lines.append("| (none) | the cheapest configuration | | | |")
    return lines + [""]


def _choice(result: TuneResult) -> list[str]:
    p = result.chosen
    lines = ["## The choice", "", "| knob | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_code(v)} |" for k, v in p.config.items() if v is not None]
    lines += ["", "| metric | predicted | measured | measured / predicted |", "|---|---:|---:|---:|"]
    measured = p.measured or {}
    for metric in _metrics(result):
        pred, meas = p.predicted.get(metric), measured.get(metric)
        if pred is None and meas is None:
            continue
        ratio = f"{meas / pred:.2f}" if _finite(pred) and _finite(meas) and pred else "—"
        lines.append(f"| {_label(result, metric)} | {_show(metric, pred)} | {_show(metric, meas)} | {ratio} |")
    if p.measured is None:
        lines += ["", "The choice was not run: its values are predicted only."]
    return lines + [""]


def _no_choice(result: TuneResult) -> list[str]:
    lines = ["## No configuration meets every target", ""]
    if result.infeasible:
        lines += [f"> {result.infeasible}", ""]
    unmet = [t for t in result.targets if not any(t.met(p.predicted.get(t.metric)) for p in result.points)]
    if unmet:
        for t in unmet:
            best = _show(t.metric, _best(result.points, t.metric))
            lines.append(f"- {_code(t.text)} ({_means(t)}) cannot be met: no configuration is predicted to meet it; "
                         f"the best predicted is {best}{_unit(t.metric)}.")
    elif any(p.feasible for p in result.points):
        lines.append("Configurations were predicted to meet every target, but their verification runs did not.")
    else:
        lines.append("Each target is met by some configuration, but none is predicted to meet all of them together.")
    return lines + [""]


def _steps(result: TuneResult) -> list[str]:
    lines = ["## Steps of the choice", "", "| step | share of an input's time | latency budget (ms per row) |",
             "|---|---:|---:|"]
    for step, share in sorted(result.step_share.items(), key=lambda kv: -kv[1]):
        budget = result.budgets.get(step)
        lines.append(f"| {_code(step)} | {share:.0%} | {_num(budget * 1000) if budget is not None else '—'} |")
    return lines + [""]


def _frontier(result: TuneResult) -> list[str]:
    feasible = frontier([p for p in result.points if p.feasible])
    rows = sorted({id(p): p for p in frontier(result.points) + feasible}.values(),
                  key=lambda p: (p.predicted["cost"], -p.predicted["throughput"]))
    if not rows:
        return []
    lines = ["## Frontier", "", "The configurations no other beats on both cost and throughput (predicted), and "
             "those no other meeting every target beats, cheapest first; **bold**: the choice.", "",
             f"| cost ({cost_unit(result.objective)}) | throughput (inputs/s) | latency p95 (ms) | agreement | "
             "meets the targets | knobs |", "|---:|---:|---:|---:|---|---|"]
    for p in rows[:FRONTIER_ROWS]:
        v = p.predicted
        cells = [_num(v["cost"] * 1000), _show("throughput", v.get("throughput")),
                 _show("latency_p95", v.get("latency_p95")), _show("agreement", v.get("agreement"))]
        if p is result.chosen:
            cells = [f"**{c}**" for c in cells]
        lines.append(f"| {' | '.join(cells)} | {'yes' if p.feasible else 'no'} | {_cell(_knobs(p.config))} |")
    if len(rows) > FRONTIER_ROWS:
        lines.append(f"| … {len(rows) - FRONTIER_ROWS} more | | | | | |")
    return lines + [""]


def _metrics(result: TuneResult) -> list[str]:
    out = ["throughput", "latency_p95", "finish", "agreement", "cost"]
    return out + (["core_s"] if result.objective != "core_s" else [])


def _label(result: TuneResult, metric: str) -> str:
    return cost_unit(result.objective) if metric == "cost" else SHOWN[metric][0]


def _means(t: Target) -> str:
    v = t.value
    return {"throughput": f"at least {_num(v)} inputs/s",
            "latency_p95": f"at most {_num(v * 1000)} ms per input (95th percentile)",
            "finish": f"the whole --input in at most {_num(v)} s",
            "agreement": f"top-1 agreement with the reference at least {v:.3g}"}[t.metric]


def _unit(metric: str) -> str:
    return {"throughput": " inputs/s", "latency_p95": " ms", "finish": " s"}.get(metric, "")


def _best(points: list[Point], metric: str, which: str = "predicted") -> float | None:
    values = [getattr(p, which)[metric] for p in points if _finite((getattr(p, which) or {}).get(metric))]
    if not values:
        return None
    return min(values) if METRICS[metric][2] else max(values)


def _show(metric: str, value) -> str:
    if value is None:
        return "—"
    if metric == "agreement":
        return f"{value:.3f}"
    if metric == "cost":
        return _num(value * 1000)
    return _num(value * SHOWN[metric][1])


def _num(v) -> str:
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "∞" if v > 0 else "—"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3g}"


def _knobs(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items() if v is not None)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text) -> str:
    text = _cell(text)
    return text if "`" in text else f"`{text}`"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------ the plots

def _matplotlib():
    try:
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("--report draws its plots with matplotlib: pip install 'beamzoo[tune]'") from exc
    return Figure, FigureCanvasAgg, ticker


def _cost_plot(mpl, result: TuneResult, metric: str, path: Path) -> None:
    figure, canvas, ticker = mpl
    fig = figure(figsize=(9, 6), dpi=100)
    canvas(fig)
    ax = fig.add_subplot()
    scale = SHOWN[metric][1]

    def xy(values):
        return values[metric] * scale, values["cost"] * 1000

    drawn = [p for p in result.points if _finite(p.predicted.get(metric)) and _finite(p.predicted.get("cost"))]
    for feasible, colour, label in ((False, INFEASIBLE, "predicted, misses a target"),
                                    (True, FEASIBLE, "predicted, meets the targets")):
        pts = [xy(p.predicted) for p in drawn if p.feasible is feasible]
        if pts:
            ax.scatter(*zip(*pts), s=18, color=colour, alpha=0.55, linewidths=0, label=label, zorder=2)
    runs = [(xy(p.predicted), xy(_as_run(p))) for p in drawn if p.measured and _finite(p.measured.get(metric))]
    for (px, py), (mx, my) in runs:
        ax.plot([px, mx], [py, my], color=MEASURED, linewidth=0.8, alpha=0.6, zorder=3)
    if runs:
        ax.scatter(*zip(*(m for _, m in runs)), s=36, color=MEASURED, label="measured (a line to its prediction)",
                   zorder=4)
    edge = frontier(result.points, metric)
    if edge:
        ax.plot(*zip(*(xy(p.predicted) for p in edge)), color=FRONTIER, linestyle=":", linewidth=1,
                label="frontier (predicted)", zorder=3)
    feasible_edge = frontier([p for p in result.points if p.feasible], metric)
    if feasible_edge:
        ax.plot(*zip(*(xy(p.predicted) for p in feasible_edge)), color=FRONTIER, linewidth=1.8,
                marker="o", markersize=3, label="feasible frontier (predicted)", zorder=3)
    lines = _target_lines(result, metric)
    for value, _, _ in lines:
        ax.axvline(value * scale, color=TARGET, linestyle="--", linewidth=1.4, zorder=1)
    xs = [xy(p.predicted)[0] for p in drawn] + [m[0] for _, m in runs] + [v * scale for v, _, _ in lines]
    ys = [xy(p.predicted)[1] for p in drawn] + [m[1] for _, m in runs]
    for axis, vs in ((ax.xaxis, xs), (ax.yaxis, ys)):
        if _log(vs):
            _log_axis(ax, axis, ticker)
    ax.relim()
    ax.autoscale_view()
    low, high = ax.get_xlim()
    for value, text, floor in lines:  # the side that misses the target, shaded
        ax.axvspan(*((low, value * scale) if floor else (value * scale, high)), color=TARGET, alpha=0.05,
                   linewidth=0, zorder=0)
    ax.set_xlim(low, high)
    for value, text, _ in lines:
        ax.annotate(text, (value * scale, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", color=TARGET, fontsize=9, rotation=90)
    _mark_choice(ax, result, metric, xy)
    ax.set_xlabel(SHOWN[metric][0])
    ax.set_ylabel(cost_unit(result.objective))
    hidden = len(result.points) - len(drawn)
    title = f"cost against {'throughput' if metric == 'throughput' else 'latency p95'}: " \
            f"{len(drawn)} configurations predicted, {len(runs)} run"
    ax.set_title(title + (f" ({hidden} without a finite value left out)" if hidden else ""), fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path)


def _as_run(p: Point) -> dict:
    """A point's measured values, with its predicted cost where the run did not measure one."""
    cost = p.measured.get("cost")
    return {**p.measured, "cost": cost if _finite(cost) else p.predicted["cost"]}


def _target_lines(result: TuneResult, metric: str) -> list[tuple[float, str, bool]]:
    """(value of ``metric``, label, whether it is a floor) of each target drawn on its axis: its
    own, and on the throughput axis, what a finish target asks of throughput."""
    out = []
    for t in result.targets:
        if t.metric == metric:
            out.append((t.value, t.text, METRICS[t.metric][0] == ">="))
        elif metric == "throughput" and t.metric == "finish":
            floor = _finish_floor(result.points, t)
            if floor is not None:
                out.append((floor, f"{t.text} (throughput>={_num(floor)})", True))
    return out


def _finish_floor(points: list[Point], target: Target) -> float | None:
    """The throughput a finish target asks for: the predictions give finish = total / throughput
    + start, so two of them with different throughputs give total and start."""
    pairs = sorted({(v["throughput"], v["finish"]) for v in (p.predicted for p in points)
                    if _finite(v.get("throughput")) and v["throughput"] > 0 and _finite(v.get("finish"))})
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        return None
    (t0, f0), (t1, f1) = pairs[0], pairs[-1]
    total = (f0 - f1) / (1 / t0 - 1 / t1)
    start = f1 - total / t1
    if total <= 0 or target.value <= start:
        return None
    return total / (target.value - start)


def _mark_choice(ax, result: TuneResult, metric: str, xy) -> None:
    p = result.chosen
    if p is None or not _finite(p.predicted.get(metric)):
        return
    ran = bool(p.measured) and _finite(p.measured.get(metric))
    x, y = xy(_as_run(p) if ran else p.predicted)
    ax.scatter([x], [y], s=260, marker="*", color=CHOSEN, edgecolors="black", linewidths=0.6, zorder=6,
               label=f"chosen ({'measured' if ran else 'predicted'})")
    right = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))[0] > 0.6
    ax.annotate("chosen: " + textwrap.fill(_knobs(p.config), 42), (x, y), xytext=(-14 if right else 14, 14),
                textcoords="offset points", ha="right" if right else "left", fontsize=8, zorder=7,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": CHOSEN, "alpha": 0.9},
                arrowprops={"arrowstyle": "-", "color": CHOSEN})


def _step_plot(mpl, result: TuneResult, path: Path) -> None:
    figure, canvas, _ = mpl
    steps = sorted(result.step_share.items(), key=lambda kv: kv[1])  # barh draws the first at the bottom
    fig = figure(figsize=(8, min(12, 1.4 + 0.45 * len(steps))), dpi=100)
    canvas(fig)
    ax = fig.add_subplot()
    names, shares = [k for k, _ in steps], [v * 100 for _, v in steps]
    ax.barh(range(len(steps)), shares, color=FRONTIER, height=0.6)
    ax.set_yticks(range(len(steps)), names, fontsize=9)
    for i, v in enumerate(shares):
        ax.annotate(f"{v:.0f} %", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, max(shares + [1]) * 1.15)
    ax.set_xlabel("share of an input's time (%)")
    ax.set_title("steps of the chosen configuration: " + textwrap.shorten(_knobs(result.chosen.config), 70)
                 if result.chosen else "steps", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _log_axis(ax, axis, ticker) -> None:
    """A log scale labelled with plain numbers (30, not 3x10^1); within two decades, 2s and 5s too."""
    (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")

    def minor(v, _):
        low, high = axis.get_view_interval()
        return _tick(v) if low > 0 and high / low <= 100 and f"{v:.1e}"[0] in "25" else ""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _tick(v)))
    axis.set_minor_formatter(ticker.FuncFormatter(minor))


def _tick(v: float) -> str:
    """1000, 30, 0.0005: three significant digits, never an exponent."""
    return np.format_float_positional(v, precision=3, fractional=False, trim="-")


def _log(values: list[float]) -> bool:
    """Whether an axis with these values is drawn on a log scale: all positive, spread over ``LOG_SPREAD``."""
    values = [v for v in values if _finite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPREAD


__all__ = ["NAMES", "cost_unit", "frontier", "markdown", "write_report"]

"""A run's report: ``OUT/report.html``, one static page that needs no network.

``Timeline`` is a run hook: it notes when rows reach the sinks of answers and
when steps dead-letter or skip rows, and, from the plan, the run's sinks and
the models its steps name. ``write_report`` draws the page from it, the run's
``RunStats`` and the files in the sinks' folders: the totals, rows over time,
each step's share of the time, dead letters by stage and reason, the
distribution of scores (of an OCR run: its lines' confidence) and the commonest
labels (words). Charts are inline SVG; a few lines of inline JS note on each
chart how many marks it drew (``data-rendered``), for a headless browser to check.
"""
from __future__ import annotations

import glob
import html
import os
import sys
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from beamzoo.core.context import Hooks
from beamzoo.core.graph import DEAD
from beamzoo.core.metrics import RunStats, reason_key

REPORT = "report.html"
COLOURS = {"scored": "#2b6cb0", "dead": "#c53030", "skipped": "#718096", "wall": "#2b6cb0", "cpu": "#dd8a2c"}
NAMES = {"scored": "scored", "dead": "dead letters", "skipped": "already done"}  # the timeline's series
WIDTH = 760
TOP = 20  # labels, words and dead-letter reasons shown


class Timeline(Hooks):
    """When rows were answered, dead-lettered and skipped (seconds since the run started),
    the run's sinks (``(path, format)`` of answers and of dead letters) and models."""

    def __init__(self):
        self.start: float | None = None
        self.run_id = ""
        self.events: list[tuple[float, str, int]] = []  # (seconds, "scored" | "dead" | "skipped", rows)
        self.answers: list[tuple[str, str]] = []
        self.dead_letters: list[tuple[str, str]] = []
        self.models: list[str] = []
        self._answer_sinks: set[str] = set()
        self._lock = threading.Lock()

    def run_started(self, ctx, plan) -> None:
        self.start, self.run_id = ctx.now(), ctx.run_id
        for s in plan.graph.steps:
            op = s.operator()
            if s.kind == "sink":
                (self.dead_letters if DEAD in s.inputs else self.answers).append((op.path, op.format))
                if DEAD not in s.inputs:
                    self._answer_sinks.add(s.id)
            for knob in op.model_knobs():
                ref = op.params.get(knob)  # a zoo reference, or a card given whole
                ref = f"{ref.get('name')}:{ref.get('version')}" if isinstance(ref, dict) else ref
                if ref and ref not in self.models:
                    self.models.append(str(ref))

    def batch_done(self, ctx, step, kind, sample) -> None:
        if self.start is None:
            return
        t = ctx.now() - self.start
        with self._lock:
            if kind == "sink" and step in self._answer_sinks and sample.rows_in:
                self.events.append((t, "scored", sample.rows_in))
            if sample.dead:
                self.events.append((t, "dead", sample.dead))
            if sample.skipped:
                self.events.append((t, "skipped", sample.skipped))


def write_report(folder: str, stats: RunStats, timeline: Timeline) -> str:
    """Write ``folder/report.html`` (whole, or not at all); its path."""
    path = os.path.join(folder, REPORT)
    tmp = os.path.join(folder, f".{REPORT}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page(folder, stats, timeline))
    os.replace(tmp, path)
    return path


def report_run(folder: str, stats: RunStats, timeline: Timeline) -> None:
    """Write a command line run's report and say where; one that cannot be written is said, not raised."""
    try:
        print(f"report written to {write_report(folder, stats, timeline)}")
    except OSError as exc:
        print(f"warning: {REPORT} not written: {exc}", file=sys.stderr)


def page(folder: str, stats: RunStats, timeline: Timeline) -> str:
    """The report's HTML: every value in it escaped, nothing fetched from anywhere."""
    answers = read_answers(timeline.answers)
    dead = read_dead_letters(timeline.dead_letters)
    body = [f"<h1>beamzoo run {esc(timeline.run_id)}</h1>", totals(folder, stats, timeline),
            "<h2>Rows over time</h2>", over_time(stats, timeline),
            "<h2>Time in each step</h2>", step_times(stats),
            "<h2>Dead letters by stage and reason</h2>", dead_letters(dead, stats),
            f"<h2>{esc(answers['score_name'])}</h2>", histogram(answers["scores"], answers["of"]),
            f"<h2>{esc(answers['count_name'])}</h2>", commonest(answers["counts"])]
    if answers["unread"] or dead["unread"]:
        body.append(note("could not read: " + ", ".join(answers["unread"] + dead["unread"])))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>beamzoo run {esc(timeline.run_id)}</title><style>{CSS}</style></head>\n"
            f"<body>\n{chr(10).join(body)}\n<script>{JS}</script>\n</body></html>\n")


# ---------------------------------------------------------------- the sections

def totals(folder: str, stats: RunStats, timeline: Timeline) -> str:
    rate = f"{stats.inputs / stats.seconds:.1f} inputs/s" if stats.seconds else "-"
    rows = [("inputs", stats.inputs), ("scored", stats.scored), ("dead letters", stats.failed),
            ("already done", stats.skipped), ("seconds", f"{stats.seconds:.2f} ({rate})"),
            ("first result after", "-" if stats.first_result_s is None else f"{stats.first_result_s:.2f} s"),
            ("runner", stats.runner or "-"), ("model", ", ".join(timeline.models) or "-"),
            ("output", os.path.abspath(folder)),
            ("written", ", ".join(f"{k}: {v}" for k, v in stats.written.items()))]
    rows += [(name, n) for name, n in sorted(stats.counters.items())]
    if stats.stopped:
        rows.append(("stopped", stats.stopped))
    cells = "".join(f"<tr><th>{esc(k)}</th><td data-total=\"{esc(k)}\">{esc(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"totals\">{cells}</table>"


def over_time(stats: RunStats, timeline: Timeline) -> str:
    """Cumulative rows answered, dead-lettered and skipped against seconds since the start."""
    if not stats.inputs:
        return note("no inputs")
    if not timeline.events:
        first = "" if stats.first_result_s is None else f"; the first result was written after " \
                                                         f"{stats.first_result_s:.2f} s"
        return note(f"{stats.runner or 'this runner'} reports its metrics only when the job has ended, so "
                    f"there is no timeline: {stats.scored} scored and {stats.failed} dead letters after "
                    f"{stats.seconds:.2f} s{first}")
    end = max(stats.seconds, max(t for t, _, _ in timeline.events))
    series = []
    for what in ("scored", "dead", "skipped"):
        got = sorted((t, n) for t, w, n in timeline.events if w == what)
        if got or what != "skipped":
            series.append((what, cumulative(got, end)))
    top = max(max(y for _, y in pts) for _, pts in series)
    return line_chart("over_time", series, end, max(top, 1), "seconds since the start", "rows")


def cumulative(events: list[tuple[float, int]], end: float, most: int = 300) -> list[tuple[float, float]]:
    """A step line through the running total of ``events`` (at most about ``most`` points)."""
    if not events:
        return [(0.0, 0.0), (end, 0.0)]
    t = np.array([e[0] for e in events])
    total = np.cumsum([e[1] for e in events])
    if len(t) > most:  # sampled on an even grid
        grid = np.linspace(0, end, most)
        i = np.searchsorted(t, grid, side="right")
        return [(0.0, 0.0)] + [(float(g), float(total[k - 1]) if k else 0.0) for g, k in zip(grid, i)]
    pts = [(0.0, 0.0)]
    for x, y in zip(t, total):
        pts += [(float(x), pts[-1][1]), (float(x), float(y))]
    return pts + [(end, float(total[-1]))]


def step_times(stats: RunStats) -> str:
    order = [s for st in stats.stages for s in st.get("steps", ())]
    names = [s for s in order if s in stats.steps] + [s for s in stats.steps if s not in order]
    total = sum(m.wall_s for m in stats.steps.values())
    if not total:
        return note("no step reported any time")
    rows = [(f"{s} ({stats.steps[s].wall_s / total:.0%})", [("wall", stats.steps[s].wall_s),
                                                          ("cpu", stats.steps[s].cpu_s)]) for s in names]
    return (hbars("steps", rows, "{:.3f} s")
            + note("wall and CPU seconds in each step, summed over its threads; the share is of the steps' "
                   "wall time in all (waiting for input and for room downstream is not counted)"))


def dead_letters(dead: dict, stats: RunStats) -> str:
    """From the dead-letter files (every run into the folder); from this run's metrics without them."""
    counts, examples = dead["counts"], dead["examples"]
    where = "in the dead-letter files (every run into this folder)"
    if not counts:
        for step, m in stats.steps.items():
            counts.update({(step, r): n for r, n in m.reasons.items()})
        where = "in this run"
    if not counts:
        return note("no dead letters")
    by_stage = Counter()
    for (stage, _), n in counts.items():
        by_stage[stage] += n
    rows = "".join(f"<tr><td>{esc(stage)}</td><td>{esc(reason)}</td><td class=\"n\">{n}</td>"
                   f"<td>{esc(examples.get((stage, reason), ''))}</td></tr>"
                   for (stage, reason), n in counts.most_common(TOP))
    more = len(counts) - TOP
    return (hbars("dead_by_stage", [(s, [("dead", n)]) for s, n in by_stage.most_common()], "{:.0f}")
            + f"<table class=\"dead\"><tr><th>stage</th><th>reason</th><th>count</th><th>for example</th></tr>"
              f"{rows}</table>" + note(f"{sum(counts.values())} dead letters {where}"
                                       + (f"; {more} more reasons not shown" if more > 0 else "")))


def histogram(values: np.ndarray, of: str, bins: int = 20) -> str:
    """A histogram of ``values`` (``of``: what they were read from, in the answers' files)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return note(f"no scores in {of}")
    lo, hi = min(0.0, float(values.min())), max(1.0, float(values.max()))
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    left, bottom, height = 60, 40, 220
    w = (WIDTH - left - 20) / bins
    ymax = max(int(counts.max()), 1)
    marks = [f"<rect class=\"mark\" x=\"{left + i * w + 1:.1f}\" y=\"{20 + height * (1 - n / ymax):.1f}\" "
             f"width=\"{w - 2:.1f}\" height=\"{height * n / ymax:.1f}\" fill=\"{COLOURS['scored']}\">"
             f"<title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {n}</title></rect>"
             for i, n in enumerate(counts) if n]
    axes = axis_y(left, 20, height, ymax) + "".join(
        text(left + i * w, 20 + height + 16, f"{edges[i]:.2g}", "middle") for i in range(0, bins + 1, 5))
    stats_line = (f"{of} in the answers' files; mean {values.mean():.3f}, median {np.median(values):.3f}, "
                  f"min {values.min():.3f}, max {values.max():.3f}")
    return svg("scores", 20 + height + bottom, axes + "".join(marks), "scores") + note(stats_line)


def commonest(counts: Counter) -> str:
    if not counts:
        return note("none")
    return hbars("commonest", [(k, [("scored", n)]) for k, n in counts.most_common(TOP)], "{:.0f}") + \
        note(f"{len(counts)} distinct in all")


# ---------------------------------------------------------------- the files

def _files(path: str, fmt: str) -> list[str]:
    """The committed files of a sink (temporaries start with a dot, so * skips them)."""
    if fmt == "parquet":
        return sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
    return sorted(glob.glob(glob.escape(path) + "-*.jsonl") + glob.glob(os.path.join(glob.escape(path), "*.jsonl")))


def _tables(sinks: list[tuple[str, str]], columns: tuple[str, ...], unread: list[str]):
    """Each file's table of those of ``columns`` it has."""
    for path, fmt in sinks:
        for f in _files(path, fmt):
            try:
                if fmt == "parquet":
                    names = pq.read_schema(f).names
                    yield pq.read_table(f, columns=[c for c in columns if c in names])
                else:
                    t = pa_json.read_json(f)
                    yield t.select([c for c in columns if c in t.column_names])
            except (OSError, pa.ArrowException) as exc:
                unread.append(f"{f} ({exc})")


def _value_counts(values) -> Counter:
    vc = pc.value_counts(pc.drop_null(values))
    return Counter(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))


def read_answers(sinks: list[tuple[str, str]]) -> dict:
    """The scores (a classifier's ``score``, or OCR ``lines``' score) and the commonest labels
    (or words read) in the answers' files."""
    scores, labels, line_scores, words, unread, rows = [], Counter(), [], Counter(), [], 0
    for t in _tables(sinks, ("score", "label", "lines"), unread):
        rows += t.num_rows
        if "score" in t.column_names:
            scores.append(pc.drop_null(t["score"]).to_numpy())
        if "label" in t.column_names:
            labels.update(_value_counts(t["label"]))
        if "lines" in t.column_names:
            lines = pc.list_flatten(t["lines"])
            line_scores.append(pc.drop_null(pc.struct_field(lines, "score")).to_numpy())
            words.update(_value_counts(pc.list_flatten(pc.utf8_split_whitespace(pc.struct_field(lines, "text")))))
    if line_scores and not scores:
        lines = np.concatenate(line_scores).astype(float)
        return {"scores": lines, "score_name": "Confidence of the lines read", "of": f"{len(lines)} lines read "
                f"on {rows} pages", "counts": words, "count_name": "Commonest words read", "unread": unread}
    return {"scores": np.concatenate(scores).astype(float) if scores else np.zeros(0), "score_name": "Scores",
            "of": f"{rows} rows", "counts": labels, "count_name": "Commonest labels", "unread": unread}


def read_dead_letters(sinks: list[tuple[str, str]]) -> dict:
    """Dead letters by (stage, reason) in the dead-letter files, with an input of each."""
    counts, examples, unread = Counter(), {}, []
    for t in _tables(sinks, ("stage", "error", "source"), unread):
        if not {"stage", "error"} <= set(t.column_names):
            continue
        sources = t["source"].to_pylist() if "source" in t.column_names else [""] * t.num_rows
        for stage, error, source in zip(t["stage"].to_pylist(), t["error"].to_pylist(), sources):
            k = (stage or "", reason_key(error or ""))
            counts[k] += 1
            examples.setdefault(k, source or "")
    return {"counts": counts, "examples": examples, "unread": unread}


# ---------------------------------------------------------------- SVG and HTML

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def note(s: str) -> str:
    return f"<p class=\"note\">{esc(s)}</p>"


def text(x: float, y: float, s: str, anchor: str = "start") -> str:
    return f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" text-anchor=\"{anchor}\">{esc(s)}</text>"


def svg(name: str, height: float, body: str, title: str) -> str:
    return (f"<svg class=\"chart\" data-chart=\"{name}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" "
            f"height=\"{height:.0f}\" viewBox=\"0 0 {WIDTH} {height:.0f}\" role=\"img\" aria-label=\"{esc(title)}\">"
            f"{body}</svg>")


def ticks(top: float, n: int = 5, whole: bool = False) -> list[float]:
    """Round numbers from 0 to about ``top`` (``whole``: whole numbers only, for counts)."""
    raw = top / n
    step = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1
    step *= next((m for m in (1, 2, 5, 10) if step * m >= raw), 10)
    step = max(step, 1) if whole else step
    return [i * step for i in range(int(top / step) + 1)]


def axis_y(left: float, top: float, height: float, ymax: float) -> str:
    out = [f"<line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{top + height}\"/>",
           f"<line class=\"axis\" x1=\"{left}\" y1=\"{top + height}\" x2=\"{WIDTH - 20}\" y2=\"{top + height}\"/>"]
    for v in ticks(ymax, whole=True):
        y = top + height * (1 - v / ymax)
        out.append(f"<line class=\"grid\" x1=\"{left}\" y1=\"{y:.1f}\" x2=\"{WIDTH - 20}\" y2=\"{y:.1f}\"/>"
                   + text(left - 6, y + 4, f"{v:g}", "end"))
    return "".join(out)


def line_chart(name: str, series: list, xmax: float, ymax: float, xlabel: str, ylabel: str) -> str:
    left, top, height = 60, 30, 220
    width = WIDTH - left - 20
    xmax = xmax or 1.0
    out = [axis_y(left, top, height, ymax), text(left - 50, top - 12, ylabel)]
    for v in ticks(xmax):
        out.append(text(left + width * v / xmax, top + height + 16, f"{v:g}", "middle"))
    out.append(text(left + width / 2, top + height + 34, xlabel, "middle"))
    for k, (what, pts) in enumerate(series):
        points = " ".join(f"{left + width * x / xmax:.1f},{top + height * (1 - y / ymax):.1f}" for x, y in pts)
        out.append(f"<polyline class=\"mark\" points=\"{points}\" fill=\"none\" stroke=\"{COLOURS[what]}\" "
                   f"stroke-width=\"2\"><title>{NAMES[what]}: {pts[-1][1]:.0f}</title></polyline>")
        x = left + 10 + 150 * k
        out.append(f"<rect x=\"{x}\" y=\"{top - 22}\" width=\"12\" height=\"12\" fill=\"{COLOURS[what]}\"/>"
                   + text(x + 16, top - 12, f"{NAMES[what]}: {pts[-1][1]:.0f}"))
    return svg(name, top + height + 44, "".join(out), name)


def hbars(name: str, rows: list[tuple[str, list[tuple[str, float]]]], fmt: str) -> str:
    """One group of bars a row: ``(label, [(colour key, value), ...])``."""
    left, bar = 260, 12
    vmax = max((v for _, vals in rows for _, v in vals), default=0) or 1
    width = WIDTH - left - 90
    out, y = [], 6
    for label, vals in rows:
        short = label if len(label) <= 38 else label[:37] + "\u2026"
        out.append(f"<g><title>{esc(label)}</title>{text(left - 8, y + bar * len(vals) / 2 + 4, short, 'end')}</g>")
        for what, v in vals:
            w = width * v / vmax
            out.append(f"<rect class=\"mark\" x=\"{left}\" y=\"{y}\" width=\"{max(w, 1):.1f}\" height=\"{bar - 1}\" "
                       f"fill=\"{COLOURS[what]}\"><title>{esc(what)}: {fmt.format(v)}</title></rect>"
                       + text(left + max(w, 1) + 4, y + bar - 2, fmt.format(v)))
            y += bar
        y += 8
    keys = sorted({what for _, vals in rows for what, _ in vals}, key=list(COLOURS).index)
    if len(keys) > 1:
        for k, what in enumerate(keys):
            out.append(f"<rect x=\"{left + 80 * k}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{COLOURS[what]}\"/>"
                       + text(left + 80 * k + 16, y + 10, what))
        y += 20
    return svg(name, y + 4, "".join(out), name)


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:800px;color:#1a202c}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse}th,td{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
table.dead td{border-top:1px solid #edf2f7}table.dead td:first-child{white-space:nowrap}
table.dead td:last-child{word-break:break-all}td.n{text-align:right}
svg text{font-size:11px;fill:#2d3748}.axis{stroke:#4a5568}.grid{stroke:#edf2f7}.note{color:#4a5568}"""

# On load: how many marks each chart drew, and its drawn size (a headless browser's --dump-dom shows them).
JS = """(function(){var charts=document.querySelectorAll('svg.chart'),drawn=0;
charts.forEach(function(s){var n=0;s.querySelectorAll('.mark').forEach(function(m){var b=m.getBBox();
if(b.width>0||b.height>0)n++;});var b=s.getBBox();
s.setAttribute('data-rendered',n+' marks '+Math.round(b.width)+'x'+Math.round(b.height));if(n)drawn++;});
document.body.setAttribute('data-charts',drawn+' of '+charts.length+' drawn');})();"""

__all__ = ["REPORT", "Timeline", "page", "report_run", "write_report"]

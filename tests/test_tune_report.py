"""beamzoo tune --report: the Markdown page and its plots, from TuneResults built by hand."""
from __future__ import annotations

import random
import re
import sys

import numpy as np
import pytest
from PIL import Image

from beamzoo.tune.report import CHOSEN, MEASURED, NAMES, TARGET, cost_unit, frontier, write_report
from beamzoo.tune.result import Point, TuneResult, parse_target

MODELS = {"efficientnet_lite0_int8:1": (0.004, 0.95), "efficientnet_lite0:1": (0.009, 0.97),
          "efficientnet_lite2:1": (0.03, 0.995)}  # core seconds per input at batch 1, agreement
TOTAL, START = 5000, 2.0  # inputs in --input, a cold start (s)


def values(model, batch, workers, price=None):
    core_1, agree = MODELS[model]
    core = core_1 * (0.6 + 0.4 / batch) * (1 + 0.03 * (workers - 1))
    tp = workers / core * (0.9 if workers > 2 else 1.0)
    out = {"throughput": tp, "latency_p95": (batch * workers + 4) / tp, "agreement": agree, "core_s": core,
           "finish": TOTAL / tp + START, "cost": core if price is None else core * price / 3600}
    return out


def result_of(targets, price=None, measure=(), step_share=None, serve_latency=True) -> TuneResult:
    """36 configurations (three models, six batch sizes, two worker counts); those in ``measure``
    (indexes) run, measuring 5 % slower and 3 % costlier than predicted; the cheapest predicted
    to meet every target chosen and run."""
    targets = [parse_target(t) for t in targets]
    points = []
    for model in MODELS:
        for batch in (1, 2, 4, 8, 16, 32):
            for workers in (1, 4):
                v = values(model, batch, workers, price)
                if not serve_latency:
                    v.pop("latency_p95")
                ok = all(t.met(v.get(t.metric)) for t in targets)
                points.append(Point({"model": model, "batch_size": batch, "workers": workers, "escalate": None},
                                    v, feasible=ok))

    def run(p):
        p.measured = {k: v * (0.95 if k == "throughput" else 1.05 if k == "latency_p95" else 1.03 if k == "cost"
                              else 1.0) for k, v in p.predicted.items()}
    for i in measure:
        run(points[i])
    ok = sorted((p for p in points if p.feasible), key=lambda p: p.predicted["cost"])
    chosen = ok[0] if ok else None
    if chosen is not None:
        run(chosen)
    line = None if chosen else f"target {targets[0].text!r} cannot be met on this machine: the best predicted is ..."
    share = step_share if step_share is not None else (
        {"classify/decode": 0.31, "classify/infer": 0.52, "classify/resize": 0.12, "classify/write": 0.05}
        if chosen else {})
    return TuneResult(targets, "price" if price else "core_s", points, chosen, step_share=share,
                      budgets={k: v * 0.02 for k, v in share.items()}, measuring_s=41.25, infeasible=line,
                      sample=200)


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert 500 <= im.width <= 2000 and 300 <= im.height <= 2000, im.size
        return np.asarray(im.convert("RGB"))


def count(img: np.ndarray, hex_colour: str, tol: int = 6) -> int:
    return int((np.abs(img.astype(int) - rgb(hex_colour)).max(axis=2) <= tol).sum())


TARGETS = ["throughput>=400", "latency_p95<=80ms", "agreement>=0.96", "finish<=60"]


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    """A report with a choice: (the result, the files written, into a directory that did not exist)."""
    result = result_of(TARGETS, measure=(0, 7, 20))
    assert result.chosen is not None and result.chosen.config["model"] == "efficientnet_lite0:1"
    return result, write_report(tmp_path_factory.mktemp("tune") / "new" / "report", result)


def test_the_report_has_its_files_the_choice_and_every_target(chosen):
    result, files = chosen
    names = [f.name for f in files]
    assert names == ["README.md", "cost_throughput.png", "cost_latency.png", "step_share.png"]
    assert all(f.is_file() for f in files)
    md = files[0].read_text()
    for t in TARGETS:
        assert f"`{t}`" in md
    for k, v in result.chosen.config.items():
        if v is not None:
            assert f"| {k} | `{v}` |" in md
    assert "escalate" not in md  # a knob the configuration does not set
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(names[1:])
    assert all((files[0].parent / link).is_file() for link in links)
    # predicted against measured, with the ratio: throughput measured 5 % below its prediction
    tp = result.chosen.predicted["throughput"]
    assert re.search(rf"\| throughput \(inputs/s\) \| {tp:.0f} \| {tp * 0.95:.0f} \| 0\.95 \|", md)
    assert re.search(r"\| CPU-core ms per input \| [0-9.]+ \| [0-9.]+ \| 1\.03 \|", md)
    assert "sample of 200 inputs" in md and "41.2 s" in md
    assert "CPU-core ms per input" in md and "price" not in md
    # the frontier: the points no other beats, and those no other meeting every target beats; the choice's in bold
    edge = {id(p) for p in frontier(result.points) + frontier([p for p in result.points if p.feasible])}
    rows = [line for line in md.split("## Frontier")[1].splitlines() if line.startswith("| ") and "knobs" not in line]
    assert len(rows) == len(edge) == 3 and sum("**" in r for r in rows) == 1
    assert re.search(r"\| no \| model=efficientnet_lite0_int8:1, batch_size=32, workers=4 \|", md)
    # steps sorted by their share, largest first
    steps = re.findall(r"\| `(classify/\w+)` \| (\d+)% \|", md)
    assert [s for s, _ in steps] == ["classify/infer", "classify/decode", "classify/resize", "classify/write"]


def test_a_plot_shows_the_points_the_targets_and_the_choice(chosen):
    _, files = chosen
    for f in files[1:]:
        img = pixels(f)
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not one flat colour
    where = files[0].parent
    tp, lat = pixels(where / "cost_throughput.png"), pixels(where / "cost_latency.png")
    for img in (tp, lat):
        assert count(img, CHOSEN, tol=2) > 40  # the chosen star
        assert count(img, MEASURED, tol=2) > 40  # the points run
    # two vertical lines on the throughput plot (throughput>=400 and finish<=60's floor), one on latency's
    assert _vertical_lines(tp, TARGET) == 2 and _vertical_lines(lat, TARGET) == 1
    share = pixels(where / "step_share.png")
    assert count(share, "#08519c", tol=2) > 2000  # the bars


def _vertical_lines(img: np.ndarray, colour: str) -> int:
    """The columns (merged where adjacent) in which the colour runs down most of the plot."""
    hit = (np.abs(img.astype(int) - rgb(colour)).max(axis=2) <= 30).sum(axis=0) > img.shape[0] * 0.3
    cols = np.flatnonzero(hit)
    return int(len(cols) and 1 + (np.diff(cols) > 2).sum())


def test_no_choice_still_plots_the_points_and_names_the_target_not_met(tmp_path):
    result = result_of(["throughput>=5000", "agreement>=0.9"], measure=(3, 9))
    assert result.chosen is None and not result.step_share
    (tmp_path / "step_share.png").write_bytes(b"an earlier report's")
    files = write_report(tmp_path, result)
    assert [f.name for f in files] == ["README.md", "cost_throughput.png", "cost_latency.png"]
    assert not (tmp_path / "step_share.png").exists()
    md = files[0].read_text()
    assert "No configuration meets every target" in md
    assert f"> {result.infeasible}" in md
    assert "- `throughput>=5000` (at least 5000 inputs/s) cannot be met" in md and "0.9` (top-1" not in md
    best = max(p.predicted["throughput"] for p in result.points)
    assert f"the best predicted is {best:.0f} inputs/s." in md
    assert "step_share.png" not in md
    img = pixels(tmp_path / "cost_throughput.png")
    assert count(img, CHOSEN, tol=2) == 0  # nothing marked chosen
    assert count(img, MEASURED, tol=2) > 20 and _vertical_lines(img, TARGET) == 1


def test_targets_met_apart_but_not_together(tmp_path):
    result = result_of(["throughput>=1000", "agreement>=0.99"])
    assert result.chosen is None
    md = write_report(tmp_path, result)[0].read_text()
    assert "none is predicted to meet all of them together" in md and "- `throughput>=1000`" not in md


def test_a_price_objective_and_no_latencies(tmp_path):
    (tmp_path / "cost_latency.png").write_bytes(b"an earlier report's")
    result = result_of(["throughput>=300"], price=0.08, measure=(1,), serve_latency=False)
    files = write_report(tmp_path, result)
    assert [f.name for f in files] == ["README.md", "cost_throughput.png", "step_share.png"]
    assert not (tmp_path / "cost_latency.png").exists()
    md = files[0].read_text()
    assert cost_unit("price") == "price per 1000 inputs" and "cost (price per 1000 inputs)" in md
    # the CPU-core cost is shown beside the price; the price per 1000 is 1000 times the price per input
    assert "| CPU-core ms per input |" in md
    price = result.chosen.predicted["cost"] * 1000
    assert re.search(rf"\| price per 1000 inputs \| {price:.3g} \|", md)
    assert "cost_latency.png" not in md and "latency p95 (ms) |" in md


def test_existing_files_are_overwritten(tmp_path):
    write_report(tmp_path, result_of(["throughput>=400"]))
    first = (tmp_path / "README.md").read_text()
    png = (tmp_path / "cost_throughput.png").read_bytes()
    write_report(tmp_path, result_of(["throughput>=100"]))
    assert (tmp_path / "README.md").read_text() != first and "`throughput>=100`" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "cost_throughput.png").read_bytes() != png


def test_a_file_where_the_directory_goes_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match=r"^--report .*taken: is a file; give a directory") as err:
        write_report(tmp_path / "taken", result_of(["throughput>=400"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"cannot create it") as err:
        write_report(tmp_path / "taken" / "below", result_of(["throughput>=400"]))
    assert "\n" not in str(err.value)


def test_the_frontier_is_the_results_in_one_sort():
    rnd = random.Random(7)
    for metric in ("throughput", "latency_p95"):
        points = []
        for i in range(120):  # ties in cost, in value, and in both
            c = rnd.randint(1, 8)
            v = 3 * c + rnd.randint(-4, 4) if metric == "throughput" else 30 - 3 * c + rnd.randint(-4, 4)
            points.append(Point({"i": i}, {"cost": c * 0.01, metric: v}))
        mine, theirs = frontier(points, metric), TuneResult([], "core_s", points, None).frontier(metric)
        assert [p.config for p in mine] == [p.config for p in theirs]
        assert 1 < len(mine) < len(points)


def test_writing_a_report_leaves_matplotlib_as_it_was(tmp_path):
    import matplotlib
    backend, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    write_report(tmp_path, result_of(TARGETS))
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    assert set(NAMES) >= {f.name for f in tmp_path.iterdir()}

"""Choosing: every configuration of the space predicted from the profile, the cheapest predicted
to meet every target run on the sample to verify it, the per-step latency budgets of the
choice, and the one line an infeasible target gets.

``tune(job)`` does it all and returns a ``TuneResult``; ``choose`` and ``budgets`` are the
pure parts (the tests give them injected profiles).
"""
from __future__ import annotations

from typing import Callable, Iterable

from beamzoo.tune.graphs import BELOW, ClassifyGraph
from beamzoo.tune.measure import run_config
from beamzoo.tune.predict import Predictor, agreement
from beamzoo.tune.profile import Profile, StepCost, profile
from beamzoo.tune.result import METRICS, Point, Target, TuneResult
from beamzoo.tune.space import (Dim, Models, cascades, grid, neighbours, runner_dims, server_dims, step_dims, strongest,
                                variants)

BUDGET_SLACK = 1.5  # without a latency target, a step's budget is its predicted latency times this
VERIFY = 3  # candidates run on the sample, cheapest first, until one meets every target
DECILES = 10  # a knob declared tune="deciles" tries the deciles of what it is compared with


def configurations(models: list[Models], dims: list[Dim]) -> Iterable[dict]:
    for m in models:
        for knobs in grid(dims):
            yield {**m.knobs(), **knobs}


def meets(values: dict | None, targets: list[Target]) -> bool:
    return values is not None and all(t.met(values.get(t.metric)) for t in targets)


def predict_all(predictor: Predictor, models: list[Models], dims: list[Dim], targets: list[Target]) -> list[Point]:
    points = []
    for config in configurations(models, dims):
        values, _ = predictor(config)
        points.append(Point(config, values, feasible=meets(values, targets)))
    return points


def candidates(points: list[Point]) -> list[Point]:
    """The points predicted feasible, cheapest first (then the fastest)."""
    return sorted((p for p in points if p.feasible),
                  key=lambda p: (p.predicted["cost"], -(p.predicted.get("throughput") or 0)))


def shares(steps: dict[str, StepCost]) -> dict[str, float]:
    """Each step's share of an input's time: its wall seconds per row times its rows per input."""
    walls = {k: c.wall_s * c.rows for k, c in steps.items()}
    total = sum(walls.values())
    return {k: w / total for k, w in walls.items()} if total > 0 else {}


def budgets(steps: dict[str, StepCost], targets: list[Target]) -> dict[str, float]:
    """Each step's latency budget in seconds per row: a latency target split over the steps in
    proportion to their predicted shares (per row of each: a step with 3 rows an input gets a
    third of its part), or without one, each step's predicted seconds per row times ``BUDGET_SLACK``."""
    limit = next((t.value for t in targets if t.metric == "latency_p95"), None)
    if limit is None:
        return {k: c.wall_s * BUDGET_SLACK for k, c in steps.items() if c.rows > 0}
    return {k: limit * share / steps[k].rows for k, share in shares(steps).items() if steps[k].rows > 0}


def show_value(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    unit = METRICS[metric][1]
    if metric == "agreement":
        return f"{value:.3f}"
    return f"{value:.1f} {unit}" if metric == "throughput" else f"{value:.3g} {unit}"


def show_config(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _best(points: list[Point], metric: str, which: str) -> Point:
    low = METRICS[metric][2]
    have = [p for p in points if (getattr(p, which) or {}).get(metric) is not None]
    pick = min if low else max
    return pick(have, key=lambda p: getattr(p, which)[metric]) if have else points[0]


def blocking(points: list[Point], targets: list[Target]) -> tuple[Target, list[Target], Point]:
    """The first target no point is predicted to meet along with the ones before it, those
    before it, and the point predicted best at it among those that meet them."""
    met = points
    for i, t in enumerate(targets):
        ok = [p for p in met if t.met(p.predicted.get(t.metric))]
        if not ok:
            return t, targets[:i], _best(met, t.metric, "predicted")
        met = ok
    raise ValueError("every target is met")


def infeasible_line(target: Target, before: list[Target], point: Point) -> str:
    measured = point.measured is not None and point.measured.get(target.metric) is not None
    value = (point.measured if measured else point.predicted).get(target.metric)
    together = f" together with {', '.join(repr(t.text) for t in before)}" if before else ""
    return (f"target {target.text!r} cannot be met on this machine{together}: the best "
            f"{'measured' if measured else 'predicted'} is {show_value(target.metric, value)} "
            f"({show_config(point.config)})")


def choose(points: list[Point], targets: list[Target], measure: Callable[[dict], dict] | None = None):
    """(the chosen point, or None, and the infeasible line, or None): the cheapest predicted to meet
    every target whose run (``measure``; without one, the prediction stands) meets them too, trying
    at most ``VERIFY``; where none does, the line names the target and the best measured."""
    tried = []
    for p in candidates(points)[:VERIFY]:
        if measure is None:
            return p, None
        p.measured = measure(p.config)
        tried.append(p)
        if meets(p.measured, targets):
            return p, None
    if tried:  # predicted to meet them, but not when run: name what the runs missed
        missed = [t for t in targets if not any(t.met(p.measured.get(t.metric)) for p in tried)]
        target = missed[0] if missed else next(t for t in targets if not t.met(tried[0].measured.get(t.metric)))
        return None, infeasible_line(target, [], _best(tried, target.metric, "measured"))
    target, before, best = blocking(points, targets)
    if measure is not None:
        best.measured = measure(best.config)
        if meets(best.measured, targets):  # the prediction was too cautious
            return best, None
    return None, infeasible_line(target, before, best)


# ------------------------------------------------------------------ a whole tuning run

def dims_of(job) -> list[Dim]:
    """The space's knobs: the step knobs of the graph the command line builds, and the runner's
    (or, with --serve, the server's)."""
    one = {k: v for k, v in job.graph.base().items() if k not in ("escalate", "escalate_below")}
    graph = job.graph.build(one, f"{job.sample_dir}/*", f"{job.workdir}/space")  # as the profile runs it
    knobs = job.graph.serve_knobs if job.serve else job.graph.knobs
    steps = step_dims(graph, knobs, job.graph.flags, job.cores)
    return steps + (server_dims(job.cores) if job.serve else runner_dims(job.cores))


def models_of(job) -> tuple[list[str], str | None]:
    """The models to profile (the command line's first) and the reference (None: decided on cost)."""
    g = job.graph
    if not isinstance(g, ClassifyGraph):
        return [""], None
    cards = variants(g.card)
    for c in cards:
        g.cards.setdefault(c.ref, c)
    refs = [g.card.ref] + [c.ref for c in cards if c.ref != g.card.ref]
    if g.escalate is not None and g.escalate.ref not in refs:
        refs.append(g.escalate.ref)
    reference = job.reference
    if reference is None:
        top = strongest(list(g.cards.values()))
        reference = top.ref if top else None
    if reference is not None and reference not in refs:
        refs.append(reference)
    return refs, reference


def thresholds(answers: dict, cores: int) -> tuple:
    """The cascade thresholds to try, as its ``below`` declares: values, or (``tune="deciles"``)
    the deciles of its fast model's scores on the sample."""
    if BELOW.tune != "deciles":
        return BELOW.candidates(cores)
    scores = sorted(s for _, s in answers.values() if s is not None)
    if not scores:
        return ()
    return tuple(sorted({round(scores[i * len(scores) // DECILES], 4) for i in range(1, DECILES)}))


def space_of(job, prof: Profile | None = None) -> tuple[list[Models], list[Dim]]:
    """The whole space: its models (single ones cheapest first, then cascades) and its knobs, as
    ``tune`` searches it (a grid or a hill-climb over the same space measures ``job.measure`` of
    each configuration). Without ``prof``, models are ordered as listed and cascades take the
    thresholds their knob declares only."""
    dims = dims_of(job)
    refs, _ = models_of(job)
    by_cost = sorted(refs, key=lambda r: prof.models[r].measured["cost"]) if prof else refs
    models = [Models(r) for r in by_cost]
    if len(refs) > 1 and not job.serve:
        models += cascades(by_cost, lambda fast: thresholds(prof.models[fast].answers if prof else {}, job.cores))
    return models, dims


def neighbours_of(config: dict, models: list[Models], dims: list[Dim]) -> list[dict]:
    """A hill-climb's moves: one step along one knob, or to the next model on either side."""
    out = neighbours(config, dims)
    m = Models.of(config) if "model" in config else Models("")
    if m in models:
        i = models.index(m)
        knobs = {k: v for k, v in config.items() if k not in ("model", "escalate", "escalate_below")}
        out += [{**models[j].knobs(), **knobs} for j in (i - 1, i + 1) if 0 <= j < len(models)]
    return out


def tune(job) -> TuneResult:
    """Profile, predict every configuration, choose and verify (``job``: ``beamzoo.tune.job.Job``)."""
    dims = dims_of(job)
    refs, reference = models_of(job)
    prof = profile(job, dims, refs, cascade=len(refs) > 1 and not job.serve)
    if reference is None and refs != [""]:
        reference = max(refs, key=lambda r: prof.models[r].measured["cost"])
        job.say(f"no card states a top-1 accuracy: agreement is counted against the costliest, {reference}")
    job.reference = reference
    models, _ = space_of(job, prof)
    predictor = Predictor(prof, job.total, job.costs, job.rate if job.serve else None, reference)
    points = predict_all(predictor, models, dims, job.targets)
    ref_answers = prof.models[reference].answers if reference else prof.models[refs[0]].answers
    job.reference_answers = ref_answers
    _attach(points, prof, ref_answers)

    def measure(config):
        values = dict(run_config(job, config, ref_answers).values)
        predicted, _ = predictor(config)
        values["core_s"] = values["cost"]
        if job.costs is not None and predicted["core_s"]:
            values["cost"] = values["core_s"] * predicted["cost"] / predicted["core_s"]
        if values.get("throughput"):
            values["finish"] = job.total / values["throughput"] + prof.start_s
        job.say(f"verified {show_config(config)}: " + ", ".join(
            f"{m} {show_value(m, values.get(m))}" for m in ("throughput", "latency_p95", "agreement")))
        return values
    chosen, line = choose(points, job.targets, measure)
    result = TuneResult(job.targets, "price" if job.costs else "core_s", points, chosen, infeasible=line,
                        sample=len(job.sample))
    if chosen is not None:
        _, steps = predictor(chosen.config)
        result.step_share = shares(steps)
        result.budgets = budgets(steps, job.targets)
    result.measuring_s = job.measuring_s
    return result


def _attach(points: list[Point], prof: Profile, reference: dict) -> None:
    """The profiling runs are measured points of the space too."""
    by_config = {_key(p.config): p for p in points}
    for config, values, answers in prof.measured:
        p = by_config.get(_key(config))
        if p is not None and p.measured is None:
            p.measured = {**values, "agreement": agreement(answers, reference)}


def _key(config: dict) -> frozenset:
    return frozenset((k, v) for k, v in config.items() if v is not None)


__all__ = ["BUDGET_SLACK", "VERIFY", "blocking", "budgets", "candidates", "choose", "configurations", "dims_of",
           "infeasible_line", "meets", "models_of", "neighbours_of", "predict_all", "shares", "show_config",
           "show_value",
           "space_of", "thresholds", "tune"]

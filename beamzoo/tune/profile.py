"""Profiling on the sample, as Llama does: each step's cost per row, per model and per knob
value, from the per-step metrics of a few whole-graph runs, never one run per combination.

1. Each model once, every knob at its default, one worker thread: each step's CPU-core and
   wall seconds per row and the rows reaching it per input (children per input for OCR's
   one-to-many steps), and each input's answer and score, from which agreement and a
   cascade's escalated fraction at any threshold follow without running it.
2. Each value of a step's knob on the command line's model, the others at default: only the
   steps that declare the knob are read (``knobs``).
3. Each value of the runner's workers: the whole graph's throughput (``workers``).
4. One cascade, for the cost of the cascade's own steps (its route, renames and merge).

A step's cost per row is the larger of its thread's CPU and wall seconds (an isolated
decoder's thread waits while its worker process computes); what the process tree spent
beyond the steps is the run's ``other_s``. With a knob changed, the steps it drives cost
what the tree spent less what the others cost at the defaults (onnxruntime's own threads
when ``threads`` is 0 are counted so).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from beamzoo.cascade import Cascade
from beamzoo.core.graph import GraphError
from beamzoo.core.registry import op_class
from beamzoo.runners.edge import EdgeRunner
from beamzoo.tune.graphs import BELOW, CLASSIFY_KNOBS
from beamzoo.tune.measure import Run, run_config
from beamzoo.tune.space import Dim, defaults

SERVED_BATCH = CLASSIFY_KNOBS["batch_size"]  # what `beamzoo serve` sets from --max_batch (Servable.from_model)
CHUNK = EdgeRunner.knobs["chunk_size"].default


@dataclass
class StepCost:
    """One step, per row: CPU-core seconds, wall seconds in one thread; ``rows``: rows reaching
    it per input; ``parallel``: it runs in every worker thread (else in one); ``branch``: one of
    a classifier's own steps after its input is loaded (a cascade runs them once per branch)."""

    core_s: float
    wall_s: float
    rows: float = 1.0
    parallel: bool = True
    branch: bool = False
    placement: dict = field(default_factory=dict)


@dataclass
class ModelProfile:
    """One model at the default knobs; ``varied``: flag -> value -> {step id: cost} and
    ``answers_at``: (flag, value) -> answers, for the knobs whose values change answers."""

    steps: dict[str, StepCost]  # step id (as the run's metrics name it) -> its cost
    answers: dict  # input -> (answer, score)
    other_s: float = 0.0  # CPU-core seconds per input outside the steps
    measured: dict | None = None  # what its run measured
    varied: dict = field(default_factory=dict)
    answers_at: dict = field(default_factory=dict)


@dataclass
class Profile:
    """What the composition reads: ``models`` (ref, or "" for a graph without variants) at the
    default knobs; ``knobs``: flag -> value -> {step id: cost} of ``base`` with that value;
    ``workers``: measured throughput of ``base`` at its defaults per worker count."""

    models: dict[str, ModelProfile]
    base: str
    defaults: dict
    knobs: dict = field(default_factory=dict)
    workers: dict = field(default_factory=dict)
    glue: dict = field(default_factory=dict)  # a cascade's own steps
    cores: int = 1
    inputs: int = 0
    start_s: float = 0.0  # a cold start: models loaded, decoders started
    scope: str = ""  # the one-model graph's composite (its steps are "scope/...")
    measured: list = field(default_factory=list)  # (config, values, answers) of every run
    results: tuple = ()  # the flags whose values change answers (each model is measured at each value)
    served: tuple | None = None  # (config, values) of the base model served at the server's defaults


def graph_ids(sid: str) -> list[str]:
    """The graph's step ids a run's step stands for (``a/decode+resize``: a fused step)."""
    first, *rest = sid.split("+")
    scope = first.rpartition("/")[0]
    return [first] + [f"{scope}/{r}" if scope else r for r in rest]


def cascade_id(sid: str, scope: str, branch: str | None) -> str:
    """A one-model graph's step id in a cascade: its classifier's steps in the ``branch``
    composite (``cascade/fast/infer``), its loader in the cascade's (``cascade/read``)."""
    if not scope or not sid.startswith(scope + "/"):
        return sid
    rest = sid[len(scope) + 1:]
    return f"{Cascade.default_id}/{branch}/{rest}" if branch else f"{Cascade.default_id}/{rest}"


def step_costs(run: Run, scope: str) -> tuple[dict[str, StepCost], float]:
    """Each step's cost per row in ``run``, and the CPU-core seconds per input beyond them."""
    parallel = {sid: st["parallel"] for st in run.stages for sid in st["steps"]}
    steps = {}
    for sid, m in run.steps.items():
        if not m.rows_in:
            continue
        try:
            step = run.graph.step(graph_ids(sid)[0])
            placement, loads = dict(step.placement), op_class(step.op).loads_input
        except (GraphError, KeyError):  # a step the compiler added (resume keys)
            placement, loads = {}, True
        steps[sid] = StepCost(max(m.cpu_s, m.wall_s) / m.rows_in, m.wall_s / m.rows_in, m.rows_in / run.inputs,
                              parallel.get(sid, False), bool(scope) and sid.startswith(scope + "/") and not loads,
                              placement)
    spent = run.cpu_s / run.inputs
    counted = sum(c.core_s * c.rows for c in steps.values())
    if counted > spent > 0:  # waits counted as work: scale the steps down to what the tree spent
        steps = {k: replace(c, core_s=c.core_s * spent / counted) for k, c in steps.items()}
        return steps, 0.0
    return steps, spent - counted


def varied(run: Run, base: ModelProfile, dim_steps: tuple[str, ...], scope: str) -> dict[str, StepCost]:
    """The costs of the steps a knob drives in ``run`` (a model's profile run with one knob
    changed): what the tree spent less what the other steps and the rest cost in the profile run
    is theirs (the other steps' wall may grow when this knob takes more cores; their cost does not)."""
    steps, _ = step_costs(run, scope)
    mine = {sid: c for sid, c in steps.items() if any(g in dim_steps for g in graph_ids(sid))}
    others = sum(c.core_s * c.rows for sid, c in base.steps.items() if sid not in mine)
    theirs = run.cpu_s / run.inputs - others - base.other_s
    counted = sum(c.core_s * c.rows for c in mine.values())
    if counted > 0 and theirs > 0:
        mine = {sid: replace(c, core_s=c.core_s * theirs / counted) for sid, c in mine.items()}
    return mine


def profile(job, dims: list[Dim], refs: list[str], cascade: bool = False) -> Profile:
    """Measure what the composition needs (``refs``: the models, the command line's first;
    ``cascade``: measure a cascade's own steps, on the cheapest model and the costliest)."""
    scope = job.graph.scope
    steps = [d for d in dims if d.level == "step"]
    runner = [d for d in dims if d.level == "runner"]
    batch = [d for d in dims if d.level == "server" and d.name == "max_batch"]
    dflt = defaults(dims)
    base_knobs = {d.flag: d.default for d in steps}
    one = {"workers": 1}
    served = {}
    if job.serve and batch:  # a served batch runs every row it has at once
        served = {"batch_size": batch[0].default}
    prof = Profile({}, refs[0], dflt, cores=job.cores, inputs=len(job.sample), scope=scope)

    def measure(config, chunk=None):
        r = run_config_batch(job, config, chunk)
        prof.measured.append((config, r.values, r.answers))
        v = r.values
        job.say(f"measured {_show(config)}: {v['throughput'] or 0:.1f} inputs/s, "
                f"{v['cost'] * 1e3:.2f} ms CPU per input")
        return r

    graphs = {}
    for ref in refs:
        r = measure({**_model(ref), **base_knobs, **served, **one}, max(CHUNK, served.get("batch_size", 0)))
        costs, other = step_costs(r, scope)
        prof.models[ref] = ModelProfile(costs, r.answers, other, r.values)
        prof.start_s = max(prof.start_s, r.warm_s)
        graphs[ref] = r.graph
    base = prof.models[refs[0]]
    for d in steps:
        prof.knobs[d.flag] = {d.default: {k: c for k, c in base.steps.items()
                                          if any(g in d.steps for g in graph_ids(k))}}
        for ref in refs if d.results else refs[:1]:  # a knob that changes answers: on every model
            m = prof.models[ref]
            for v in d.values:
                if v != d.default:
                    r = measure({**_model(ref), **base_knobs, d.flag: v, **one})
                    m.varied.setdefault(d.flag, {})[v] = varied(r, m, d.steps, scope)
                    m.answers_at[(d.flag, v)] = r.answers
        prof.knobs[d.flag].update(base.varied.get(d.flag, {}))
    prof.results = tuple(d.flag for d in steps if d.results)
    for d in batch:
        ids = tuple(s.id for s in graphs[refs[0]].steps
                    if any(k is SERVED_BATCH for k in op_class(s.op).knobs.values()))
        prof.knobs[d.flag] = {d.default: {k: c for k, c in base.steps.items() if any(g in ids for g in graph_ids(k))}}
        for v in d.values:
            if v != d.default:
                r = measure({**_model(refs[0]), "batch_size": v, **one}, max(CHUNK, v))
                prof.knobs[d.flag][v] = varied(r, base, ids, scope)
    if job.serve:  # what serving costs beyond the steps (requests, batches, answers): one served run
        config = {**_model(refs[0]), **{d.flag: d.default for d in dims if d.level == "server"}}
        r = run_config(job, config)
        prof.served = (config, r.values)
        prof.measured.append((config, r.values, r.answers))
        job.say(f"served {_show(config)} at {job.rate:g}/s: latency_p95 {r.values['latency_p95']:.3g} s, "
                f"{r.values['cost'] * 1e3:.2f} ms CPU per input")
    else:
        prof.workers[1] = base.measured["throughput"]
        for d in runner:
            for w in d.values:
                if w != 1:
                    prof.workers[w] = measure({**_model(refs[0]), **base_knobs, "workers": w}).values["throughput"]
    if cascade:
        by_cost = sorted(refs, key=lambda ref: prof.models[ref].measured["cost"])
        fast, strong = by_cost[0], by_cost[-1]
        r = measure({"model": fast, "escalate": strong, "escalate_below": BELOW.default, **base_knobs, **one})
        costs, _ = step_costs(r, Cascade.default_id)
        mine = {cascade_id(k, scope, "fast" if c.branch else None) for k, c in prof.models[fast].steps.items()}
        mine |= {cascade_id(k, scope, "strong") for k, c in prof.models[strong].steps.items() if c.branch}
        prof.glue = {k: c for k, c in costs.items() if k not in mine}
    return prof


def run_config_batch(job, config: dict, chunk: int | None = None) -> Run:
    """A profiling run: always the batch graph on the edge runner, also when tuning a server."""
    serve, job.serve = job.serve, False
    try:
        return run_config(job, config, chunk_size=chunk)
    finally:
        job.serve = serve


def _model(ref: str) -> dict:
    return {"model": ref} if ref else {}


def _show(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


__all__ = ["ModelProfile", "Profile", "StepCost", "cascade_id", "graph_ids", "profile", "step_costs", "varied"]

"""Composing measured step costs into a configuration's throughput, latency, agreement and cost.

For a configuration, each step costs what its model's profile measured, times what its
knobs' values measured against their defaults on the base model, for the rows that reach
it: every input for the fast model's steps, the escalated fraction (from the fast model's
scores on the sample) for a cascade's strong branch, the children per input for OCR's
one-to-many steps. Then, per input:

- cost: the sum of CPU-core seconds (or, with ``Costs``, of their prices by placement);
- throughput: the least of the cores over the cost, the workers over the wall seconds of
  the row-parallel steps, and one over the slowest single-thread step, times what the
  workers measured against that composition on the base configuration;
- latency_p95: the edge runner's rows in flight (its queue, its workers' tasks, the
  source's next) over the throughput; with ``rate`` (``--serve``), a batch's fill, its run and its wait for a
  worker (M/D/c: half the M/M/c wait, its 95th percentile from the Erlang C tail);
- agreement: of the answers on the sample with the reference's (a cascade's: the strong
  model's answer where the fast one scored below the threshold);
- finish: the whole ``--input`` at that throughput, after a cold start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import yaml

from beamzoo.runners.edge import EdgeRunner
from beamzoo.tune.profile import CHUNK, ModelProfile, Profile, StepCost, cascade_id
from beamzoo.tune.space import Models

COST_KEYS = {"cpu": "price per CPU core-hour", "gpu": "price per GPU-hour (steps placed on device gpu)",
             "tiers": "price per core-hour by a step's placement tier, e.g. {device: 0, cloud: 0.08}"}


class CostsError(ValueError):
    """A --costs file that cannot be read: one line naming the file and the key."""


@dataclass(frozen=True)
class Costs:
    """Prices per hour: ``cpu`` a core, ``gpu`` a GPU, ``tiers`` a core by placement tier.

    >>> Costs(cpu=0.04, tiers={"cloud": 0.1}).per_second({"tier": "cloud"}) * 3600
    0.1
    """

    cpu: float
    gpu: float | None = None
    tiers: dict = field(default_factory=dict)

    def per_second(self, placement: dict) -> float:
        if placement.get("device") == "gpu" and self.gpu is not None:
            return self.gpu / 3600
        return self.tiers.get(placement.get("tier"), self.cpu) / 3600


def read_costs(path: str) -> Costs:
    """A costs file: ``{cpu: PRICE, gpu: PRICE, tiers: {TIER: PRICE}}`` (per hour; cpu required)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise CostsError(f"--costs {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CostsError(f"--costs {path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CostsError(f"--costs {path}: write a mapping, e.g. 'cpu: 0.04' (price per core-hour)")
    unknown = sorted(set(map(str, data)) - set(COST_KEYS))
    if unknown:
        raise CostsError(f"--costs {path}: unknown key {unknown[0]!r}; the keys are "
                         + "; ".join(f"{k} ({v})" for k, v in COST_KEYS.items()))
    if "cpu" not in data:
        raise CostsError(f"--costs {path}: cpu (the price per CPU core-hour) is missing")
    tiers = data.get("tiers") or {}
    if not isinstance(tiers, dict):
        raise CostsError(f"--costs {path}: tiers must map a tier to its price per core-hour, e.g. {{cloud: 0.08}}")
    prices = [("cpu", data["cpu"]), ("gpu", data.get("gpu", 0))] + [(f"tiers.{k}", v) for k, v in tiers.items()]
    for key, value in prices:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise CostsError(f"--costs {path}: {key} must be a price (a number >= 0), got {value!r}")
    gpu = data.get("gpu")
    return Costs(float(data["cpu"]), None if gpu is None else float(gpu), {str(k): float(v) for k, v in tiers.items()})


def escalated(answers: dict, below: float) -> float:
    """The fraction of the sample a cascade escalates: the fast model's score below ``below``."""
    scores = [s for _, s in answers.values() if s is not None]
    return sum(s < below for s in scores) / len(scores) if scores else 0.0


def agreement(answers: dict, reference: dict) -> float | None:
    common = [k for k in answers if k in reference]
    return sum(answers[k][0] == reference[k][0] for k in common) / len(common) if common else None


def cascade_answers(fast: dict, strong: dict, below: float) -> dict:
    """What a cascade answers on the sample: the strong model's answer where the fast one was unsure."""
    return {k: (strong[k] if s is not None and s < below else (a, s)) for k, (a, s) in fast.items() if k in strong}


def capacity(steps: dict[str, StepCost], other_s: float, cores: int, workers: int) -> float:
    """Inputs/s the steps allow: the cores' CPU, the workers' threads, the slowest one-thread step."""
    cpu = sum(c.core_s * c.rows for c in steps.values()) + other_s
    threads = sum(c.wall_s * c.rows for c in steps.values() if c.parallel)
    serial = max((c.wall_s * c.rows for c in steps.values() if not c.parallel), default=0.0)
    return min(cores / cpu if cpu > 0 else math.inf, workers / threads if threads > 0 else math.inf,
               1 / serial if serial > 0 else math.inf)


def _nearest(values, v):
    if v in values:
        return v
    numbers = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not numbers or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return min(numbers, key=lambda x: (abs(x - v), x))


def _erlang_c(servers: int, load: float) -> float:
    """The chance a batch waits for one of ``servers`` busy with ``load`` (offered, in servers)."""
    if load >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= load / k
        total += term
    last = term * load / servers / (1 - load / servers)
    return last / (total + last)


class Predictor:
    """``predict(config) -> (values, step latency)`` from a ``Profile``. ``total``: the inputs of
    ``--input``; ``costs``: prices (else CPU-core seconds); ``rate``: requests/s when served;
    ``reference``: the model whose answers agreement counts against."""

    def __init__(self, profile: Profile, total: int, costs: Costs | None = None, rate: float | None = None,
                 reference: str | None = None):
        self.p, self.total, self.costs, self.rate = profile, total, costs, rate
        self.reference = profile.models[reference].answers if reference in profile.models else None
        self._agreement: dict = {}
        self._efficiency: dict = {}
        self._overhead: float | None = None

    # ------------------------------------------------------------ the steps of a configuration
    def steps(self, config: dict) -> dict[str, StepCost]:
        m = Models.of(config) if "model" in config else Models("")
        fast = self.p.models[m.model]
        if m.escalate is None:
            return {sid: self._knobbed(fast, sid, c, config) for sid, c in fast.steps.items()}
        scope = self.p.scope
        out = {cascade_id(sid, scope, "fast" if c.branch else None): self._knobbed(fast, sid, c, config)
               for sid, c in fast.steps.items()}
        f = escalated(self.answers(m.model, config), m.below)
        strong = self.p.models[m.escalate]
        for sid, c in strong.steps.items():
            if c.branch:
                k = self._knobbed(strong, sid, c, config)
                out[cascade_id(sid, scope, "strong")] = replace(k, rows=k.rows * f)
        out.update(self.p.glue)
        return out

    def _knobbed(self, model: ModelProfile, sid: str, c: StepCost, config: dict) -> StepCost:
        """``c`` with the measured effect of each knob value of ``config`` on its step: as measured
        on this model where it was, else as on the base model, relative to the default."""
        for flag, by_value in self.p.knobs.items():
            default = self.p.defaults.get(flag)
            v = _nearest(by_value, config.get(flag, default))
            if v is None or v == default:
                continue
            now, was = model.varied.get(flag, {}).get(v, {}).get(sid), model.steps.get(sid)
            if now is None:
                now, was = by_value[v].get(sid), by_value.get(default, {}).get(sid)
            if now is None or was is None:
                continue
            c = replace(c, core_s=c.core_s * _ratio(now.core_s, was.core_s),
                        wall_s=c.wall_s * _ratio(now.wall_s, was.wall_s), parallel=now.parallel)
        return c

    def answers(self, ref: str, config: dict) -> dict:
        """The model's answers on the sample at ``config``'s values of the knobs that change answers
        (measured one knob at a time: the first such knob off its default decides)."""
        model = self.p.models[ref]
        for flag in self.p.results:
            v = config.get(flag, self.p.defaults.get(flag))
            if v != self.p.defaults.get(flag) and (flag, v) in model.answers_at:
                return model.answers_at[(flag, v)]
        return model.answers

    # ------------------------------------------------------------ predictions
    def agreement(self, config: dict) -> float | None:
        m = Models.of(config) if "model" in config else Models("")
        key = (m, tuple(config.get(f) for f in self.p.results))
        if key not in self._agreement:
            if self.reference is None:
                self._agreement[key] = None if m.model else 1.0  # no variants: speed knobs only
            else:
                fast = self.answers(m.model, config)
                answers = fast if m.escalate is None else cascade_answers(
                    fast, self.answers(m.escalate, config), m.below)
                self._agreement[key] = agreement(answers, self.reference)
        return self._agreement[key]

    def efficiency(self, workers: int) -> float:
        """What the base configuration measured at ``workers`` over what its steps compose to."""
        w = _nearest(self.p.workers, workers)
        if w is None:
            return 1.0
        if w not in self._efficiency:
            base = {"model": self.p.base, **self.p.defaults, "workers": w} if self.p.base else \
                {**self.p.defaults, "workers": w}
            composed = capacity(self.steps(base), self._other(base), self.p.cores, w)
            measured = self.p.workers[w]
            self._efficiency[w] = measured / composed if measured and composed and math.isfinite(composed) else 1.0
        return self._efficiency[w]

    def _other(self, config: dict) -> float:
        return self.p.models[config.get("model", "")].other_s

    def cost(self, steps: dict[str, StepCost], other_s: float) -> tuple[float, float]:
        """(CPU-core seconds, the objective) per input."""
        core = sum(c.core_s * c.rows for c in steps.values()) + other_s
        if self.costs is None:
            return core, core
        price = sum((c.wall_s if c.placement.get("device") == "gpu" and self.costs.gpu is not None else c.core_s)
                    * c.rows * self.costs.per_second(c.placement) for c in steps.values())
        return core, price + other_s * self.costs.per_second({})

    def __call__(self, config: dict) -> tuple[dict, dict[str, StepCost]]:
        """The predicted values of ``config``, and its steps' costs (whose wall seconds per row and
        rows per input make each step's part of an input's time)."""
        if self.rate is not None:
            return self._served(config)
        steps, other = self.steps(config), self._other(config)
        workers = config.get("workers", self.p.cores)
        tp = capacity(steps, other, self.p.cores, workers) * self.efficiency(workers)
        in_flight = min(self.total, self._in_flight(workers))
        latency = in_flight / tp
        core, cost = self.cost(steps, other)
        values = {"throughput": tp, "latency_p95": latency, "agreement": self.agreement(config), "cost": cost,
                  "core_s": core, "finish": self.total / tp + self.p.start_s}
        return values, steps

    def _in_flight(self, workers: int) -> int:
        """Rows between the source and the sink once the edge runner's queues fill: the inbox of the
        row-parallel stage, a task in each worker, and the one the source holds waiting for room."""
        return (EdgeRunner(workers=workers, progress=False).queue_depth + workers + 2) * CHUNK

    def serve_overhead(self) -> float:
        """CPU-core seconds per request that serving spends beyond the steps (taking requests,
        cutting batches, answering): the served run of the profile against its composition."""
        if self._overhead is None:
            self._overhead = 0.0
            if self.p.served is not None:
                config, values = self.p.served
                composed = self._served(config, overhead=0.0)[0]["core_s"]
                self._overhead = max(0.0, values["cost"] - composed)
        return self._overhead

    def _served(self, config: dict, overhead: float | None = None) -> tuple[dict, dict[str, StepCost]]:
        rate, cores = self.rate, self.p.cores
        overhead = self.serve_overhead() if overhead is None else overhead
        top, delay = config["max_batch"], config["max_delay_ms"] / 1000
        servers = max(1, min(config.get("workers") or cores, cores))
        b = min(top, 1 + rate * delay)
        for _ in range(4):  # a batch holds what arrives while the workers are busy
            steps = self._branch(config, b)
            row = sum(c.wall_s * c.rows for c in steps.values())
            b = min(top, max(1 + rate * delay, rate * b * row / servers, 1))
        steps = self._branch(config, b)
        row = sum(c.wall_s * c.rows for c in steps.values())
        core, cost = self.cost(steps, overhead)
        full = self._branch(config, top)
        most = min(servers / sum(c.wall_s * c.rows for c in full.values()),
                   cores / (sum(c.core_s * c.rows for c in full.values()) + overhead))
        busy = max(rate * row / servers, rate * core / cores)
        service = b * row
        if busy >= 1:
            latency = math.inf
        else:
            fill = min(delay, (b - 1) / rate)
            waits = _erlang_c(servers, busy * servers)
            tail = math.log(waits / 0.05) if waits > 0.05 else 0.0
            latency = fill + service + 0.5 * tail * service / (servers * (1 - busy))
        tp = min(rate, most)
        values = {"throughput": tp, "latency_p95": latency, "agreement": self.agreement(config), "cost": cost,
                  "core_s": core, "finish": self.total / tp + self.p.start_s}
        return values, steps

    def _branch(self, config: dict, batch: float) -> dict[str, StepCost]:
        """The served graph's steps (the classifier's own) at a batch of ``batch`` rows."""
        size = _nearest(self.p.knobs.get("max_batch", {}), max(1, round(batch)))
        steps = self.steps({**config, "max_batch": size} if size is not None else config)
        return {k: c for k, c in steps.items() if c.branch} or steps


def _ratio(now: float, was: float) -> float:
    return now / was if was > 0 else 1.0


__all__ = ["COST_KEYS", "Costs", "CostsError", "ModelProfile", "Predictor", "capacity", "cascade_answers",
           "escalated", "read_costs"]

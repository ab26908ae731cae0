"""What a tuning run finds: targets, the configurations it predicted and measured, its choice.

>>> t = parse_target("throughput>=80")
>>> (t.metric, t.op, t.value, t.met(85.0), t.met(79.0))
('throughput', '>=', 80.0, True, False)
>>> parse_target("latency_p95<=250ms").value
0.25
>>> parse_target("speed>=3")
Traceback (most recent call last):
...
beamzoo.tune.result.TargetError: --target 'speed>=3': unknown metric 'speed'; targets are throughput>=R (inputs/s), latency_p95<=T (seconds per input), finish<=T (seconds for the whole --input), agreement>=F (0 to 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# metric -> (the one comparison it takes, its unit, lower is better)
METRICS = {"throughput": (">=", "inputs/s", False), "latency_p95": ("<=", "s", True),
           "finish": ("<=", "s", True), "agreement": (">=", "", False)}
_TARGET = re.compile(r"^\s*(?P<metric>[a-z_0-9]+)\s*(?P<op><=|>=)\s*(?P<value>[0-9.eE+-]+)\s*(?P<unit>ms|s|%)?\s*$")


class TargetError(ValueError):
    """A target that cannot be read: one line naming it."""


@dataclass(frozen=True)
class Target:
    metric: str  # throughput | latency_p95 | finish | agreement
    op: str  # ">=" or "<="
    value: float  # inputs/s, seconds, or a fraction
    text: str  # as the user wrote it

    def met(self, measured: float | None) -> bool:
        if measured is None:
            return False
        floor = METRICS[self.metric][0] == ">="  # parse_target took the metric's one comparison
        return measured >= self.value if floor else measured <= self.value


def parse_target(text: str) -> Target:
    m = _TARGET.match(text)
    where = f"--target {text!r}"
    if not m:
        raise TargetError(f"{where}: write METRIC>=VALUE or METRIC<=VALUE, e.g. 'throughput>=80', "
                          "'latency_p95<=0.25', 'agreement>=0.97'")
    metric, op, unit = m["metric"], m["op"], m["unit"]
    if metric not in METRICS:
        raise TargetError(f"{where}: unknown metric {metric!r}; targets are throughput>=R (inputs/s), "
                          "latency_p95<=T (seconds per input), finish<=T (seconds for the whole --input), "
                          "agreement>=F (0 to 1)")
    want = METRICS[metric][0]
    if op != want:
        raise TargetError(f"{where}: {metric} takes {want} (a {'floor' if want == '>=' else 'ceiling'}), not {op}")
    try:
        value = float(m["value"])
    except ValueError:
        raise TargetError(f"{where}: {m['value']!r} is not a number") from None
    if unit == "ms":
        value /= 1000
    elif unit == "%":
        value /= 100
    if unit in ("ms", "s") and metric not in ("latency_p95", "finish"):
        raise TargetError(f"{where}: {metric} is not a time; leave the unit out")
    if unit == "%" and metric != "agreement":
        raise TargetError(f"{where}: only agreement is a fraction")
    if value <= 0 or (metric == "agreement" and value > 1):
        raise TargetError(f"{where}: {'a fraction between 0 and 1' if metric == 'agreement' else 'must be > 0'}")
    return Target(metric, op, value, text.strip())


@dataclass
class Point:
    """One configuration: its knobs (command-line flag -> value), what the composed step costs
    predict for it, what a run of it measured (None where it was not run), and whether it is
    predicted to meet every target. ``predicted``/``measured`` keys: throughput (inputs/s),
    latency_p95 (s), agreement (0-1), cost (the objective per input: CPU-core seconds, or a price)."""

    config: dict
    predicted: dict
    measured: dict | None = None
    feasible: bool = False


@dataclass
class TuneResult:
    targets: list[Target]
    objective: str  # "core_s" (CPU-core seconds per input) or "price" (per input, from --costs)
    points: list[Point]  # every configuration predicted; those measured have ``measured``
    chosen: Point | None  # the cheapest predicted feasible, after its verification run
    step_share: dict[str, float] = field(default_factory=dict)  # step id -> share of time, chosen config
    budgets: dict[str, float] = field(default_factory=dict)  # step id -> latency budget, seconds per row
    measuring_s: float = 0.0  # wall seconds spent measuring (profiles and the verification run)
    infeasible: str | None = None  # one line: which target cannot be met and the best measured
    sample: int = 0  # inputs in the sample

    def frontier(self, metric: str = "throughput") -> list[Point]:
        """The points no other beats on both cost and ``metric`` (predicted)."""
        better_low = METRICS[metric][2]
        pts = [p for p in self.points if p.predicted.get(metric) is not None]
        out = []
        for p in pts:
            v, c = p.predicted[metric], p.predicted["cost"]
            dominated = any((q.predicted["cost"] <= c and (q.predicted[metric] <= v if better_low
                                                           else q.predicted[metric] >= v))
                            and (q.predicted["cost"], q.predicted[metric]) != (c, v) for q in pts)
            if not dominated:
                out.append(p)
        return sorted(out, key=lambda p: p.predicted["cost"])


__all__ = ["METRICS", "Point", "Target", "TargetError", "TuneResult", "parse_target"]

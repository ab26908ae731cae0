"""Drift and bias gates on a window of output rows.

A gate watches a metric of the last ``window`` rows it has seen and, while
the metric's predicate holds, acts:

- ``warn``: a log line when the predicate starts to hold, and a count of the
  rows it held for (the step's ``<id>_held`` counter);
- ``divert``: those rows go to the ``review`` port (with a ``review_reason``);
- ``stop``: the run stops cleanly: no more inputs are read, the rows already
  read are answered and written, outputs are committed, and the reason is
  printed (exit code 3 in the command-line tools). Only the edge runner can
  stop its source part-way; Beam runners refuse a graph with a stop gate.

Metrics: ``mean_confidence`` (mean top-1 score), ``fraction_below(X)`` (the
fraction of rows whose score is below X), ``label_distance`` (total variation
distance, 0..1, between the window's label distribution and a reference
profile saved from an earlier run) and ``bias(COLUMN[, PREDICATE])`` (the
rate of rows where PREDICATE holds, default ``score >= 0.5``, in each group
of COLUMN: the lowest group's rate over the highest's). On the command line:
``--gate 'mean_confidence<0.3:stop'``.

The metrics and the gate are plain state machines (``make_metric``,
``GateState``), tested without a pipeline; ``Gate`` is the graph step. A stop is
asked of the run's context, so two runs in one process do not share it.
"""
from __future__ import annotations

import logging
import operator
import re
import threading
from collections import Counter, deque

import pyarrow as pa
import pyarrow.compute as pc

from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result
from beamzoo.transforms.flow import parse_predicate

log = logging.getLogger("beamzoo.gates")

METRICS = ("mean_confidence", "fraction_below", "label_distance", "bias")
ACTIONS = ("warn", "divert", "stop")
COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
REVIEW_REASON = pa.field("review_reason", pa.string())


# ------------------------------------------------------------------ metrics

class MeanConfidence:
    def __init__(self, window: int):
        self.values, self.total = deque(maxlen=window), 0.0

    def push(self, row: dict) -> float | None:
        if len(self.values) == self.values.maxlen:
            self.total -= self.values[0]
        self.values.append(row["score"])
        self.total += row["score"]
        return self.total / len(self.values) if len(self.values) == self.values.maxlen else None


class FractionBelow(MeanConfidence):
    def __init__(self, window: int, below: float):
        super().__init__(window)
        self.below = below

    def push(self, row):
        return super().push({"score": 1.0 if row["score"] < self.below else 0.0})


class LabelDistance:
    """Total variation distance between the window's labels and ``reference`` ({label: fraction})."""

    def __init__(self, window: int, reference: dict[str, float]):
        self.labels, self.counts, self.ref = deque(maxlen=window), Counter(), reference

    def push(self, row):
        if len(self.labels) == self.labels.maxlen:
            old = self.labels[0]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.labels.append(row["label"])
        self.counts[row["label"]] += 1
        n = len(self.labels)
        if n < self.labels.maxlen:
            return None
        seen = sum(abs(c / n - self.ref.get(label, 0.0)) - self.ref.get(label, 0.0)
                   for label, c in self.counts.items())
        return max(0.0, 0.5 * (seen + sum(self.ref.values())))


class Bias:
    """Per group of ``group``: the rate of rows where ``hit(row)``; the lowest rate over the
    highest, among groups with at least ``min_group`` rows in the window."""

    def __init__(self, window: int, group: str, hit, min_group: int):
        self.rows, self.group, self.hit, self.min_group = deque(maxlen=window), group, hit, min_group
        self.n, self.hits = Counter(), Counter()

    def push(self, row):
        if len(self.rows) == self.rows.maxlen:
            g, h = self.rows[0]
            self.n[g] -= 1
            self.hits[g] -= h
        g, h = row[self.group], int(bool(self.hit(row)))
        self.rows.append((g, h))
        self.n[g] += 1
        self.hits[g] += h
        rates = [self.hits[k] / c for k, c in self.n.items() if c >= self.min_group]
        if len(self.rows) < self.rows.maxlen or len(rates) < 2:
            return None
        return 1.0 if max(rates) == 0 else min(rates) / max(rates)


def rate_predicate(text: str):
    """``"score >= 0.5"`` -> a function of a row."""
    p = parse_predicate(text)
    cmp = {**COMPARE, "==": operator.eq, "!=": operator.ne}[p["op"]]
    return lambda row: row[p["field"]] is not None and cmp(row[p["field"]], p["value"])


def make_metric(params: dict):
    m, w = params["metric"], params["window"]
    if m == "mean_confidence":
        return MeanConfidence(w)
    if m == "fraction_below":
        return FractionBelow(w, params["below"])
    if m == "label_distance":
        return LabelDistance(w, params["reference"])
    return Bias(w, params["group"], rate_predicate(params["rate"]), params["min_group"])


class GateState:
    """Feeds rows to a metric; ``push(row)`` -> (the metric's value or None, whether the
    predicate holds). Counts the rows it held for and the times it started to hold."""

    def __init__(self, params: dict):
        self.metric, self.cmp, self.bound = make_metric(params), COMPARE[params["op"]], params["bound"]
        self.held = self.onsets = 0
        self.holding = False

    def push(self, row: dict) -> tuple[float | None, bool]:
        value = self.metric.push(row)
        holds = value is not None and self.cmp(value, self.bound)
        self.onsets += holds and not self.holding
        self.held += holds
        self.holding = holds
        return value, holds


# ------------------------------------------------------------------ the step

_SPEC = re.compile(r"^\s*(?P<metric>[A-Za-z_]+)\s*(?:\((?P<arg>[^)]*)\))?\s*(?P<op><=|>=|<|>)\s*"
                   r"(?P<bound>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?::\s*(?P<action>\w*)\s*)?$")


def parse_gate(text: str) -> dict:
    """``'mean_confidence<0.3:stop'`` -> the Gate's keyword arguments (action default warn)."""
    m = _SPEC.match(text)
    if not m:
        raise KnobError(f"cannot read the gate {text!r}; write METRIC OP NUMBER[:ACTION], e.g. "
                        f"'mean_confidence<0.3:stop' (metrics: mean_confidence, fraction_below(X), "
                        f"label_distance, bias(COLUMN[, PREDICATE]); actions: {', '.join(ACTIONS)})")
    kw = {"metric": m["metric"], "op": m["op"], "bound": float(m["bound"]), "action": m["action"] or "warn"}
    arg = (m["arg"] or "").strip()
    if kw["metric"] == "fraction_below" and arg:
        try:
            kw["below"] = float(arg)
        except ValueError:
            raise KnobError(f"gate {text!r}: fraction_below takes a number, got {arg!r}") from None
    elif kw["metric"] == "bias" and arg:
        group, _, rate = arg.partition(",")
        kw["group"] = group.strip()
        if rate.strip():
            kw["rate"] = rate.strip()
    elif arg:
        raise KnobError(f"gate {text!r}: {kw['metric']} takes no argument, got ({arg})")
    return kw


class Gate(Operator):
    """A drift or bias gate: rows in, rows out (and, for ``divert``, a ``review`` port)."""

    name = "gate"
    kind = "route"
    default_id = "gate"
    parallel = False  # one window sees every row (per process)
    knobs = {"metric": Knob("mean_confidence", str, choices=METRICS, doc="what the gate watches"),
             "op": Knob("<", str, choices=tuple(COMPARE), doc="how the metric compares with the bound"),
             "bound": Knob(0.5, float, doc="the metric's bound"),
             "action": Knob("warn", str, choices=ACTIONS, doc="what happens while the predicate holds"),
             "window": Knob(100, int, low=1, high=1_000_000, doc="rows each gate's metric is computed over"),
             "below": Knob(0.5, float, low=0.0, high=1.0, doc="fraction_below's confidence"),
             "reference": Knob(None, dict, doc="label_distance's {label: fraction} profile"),
             "group": Knob(None, str, doc="bias: the column whose groups are compared"),
             "rate": Knob("score >= 0.5", str, doc="bias: the predicate whose rate is compared"),
             "min_group": Knob(10, int, low=1, doc="bias: rows a group needs in the window to count"),
             "spec": Knob("", str, results=False, doc="the gate as the user wrote it, for messages")}

    def configure(self):
        p = self.params
        step = self.id
        metric, action, op = p["metric"], p["action"], p["op"]
        if metric == "label_distance" and not p["reference"]:
            raise KnobError(f"Gate step {step!r}: label_distance needs a reference profile "
                            "(a run's labels: save_profile / --save_profile, then --gate_profile FILE)")
        if metric == "bias" and not p["group"]:
            raise KnobError(f"Gate step {step!r}: bias needs the column whose groups it compares, "
                            "e.g. bias(region)<0.8")
        if metric == "bias":
            try:
                rate_predicate(p["rate"])
            except ValueError as exc:
                raise KnobError(f"Gate step {step!r}: bias rate: {exc}") from None
        if not p["spec"]:
            p["spec"] = f"{metric}{op}{p['bound']:g}:{action}"
        need = {"score"} | ({"label"} if p["metric"] == "label_distance" else set())
        if p["metric"] == "bias":
            need |= {p["group"], _field(p["rate"])}
        self.needs = sorted(need)
        self.requires = pa.schema([])
        self.state = GateState(p)
        self.lock = threading.Lock()

    @property
    def ports(self):
        return ("out", "review") if self.params["action"] == "divert" else ("out",)

    def stops_run(self) -> bool:
        return self.params["action"] == "stop"

    def output_schemas(self, inputs):
        (schema,) = inputs
        missing = [n for n in self.needs if n not in schema.names]
        if missing:
            raise KnobError(f"Gate step {self.id!r} ({self.params['spec']}) reads {', '.join(missing)}, which "
                            f"its input lacks; the input has: {', '.join(schema.names)}")
        out = {"out": schema}
        if self.params["action"] == "divert":
            out["review"] = pa.schema([*schema, REVIEW_REASON])
        return out

    def reason(self, value: float) -> str:
        p = self.params
        return f"gate {self.id!r} ({p['spec']}): {p['metric']} = {value:.3f} over the last {p['window']} rows"

    def process(self, batch):
        rows = batch.select(self.needs).to_pylist()
        held, reasons = [], []
        with self.lock:
            for row in rows:
                onsets = self.state.onsets
                value, holds = self.state.push(row)
                held.append(holds)
                if holds:
                    reasons.append(self.reason(value))
                    if self.state.onsets > onsets:
                        self._act_on_onset(reasons[-1])
        self.ctx.count(f"{self.id}_held", sum(held))  # a step's own count: the run's stats add it up
        action = self.params["action"]
        if action != "divert":
            return Result({"out": batch}, NO_DEAD_LETTERS)
        mask = pa.array(held, pa.bool_())
        review = batch.filter(mask)
        review = review.append_column(REVIEW_REASON, pa.array(reasons, pa.string()))
        return Result({"out": batch.filter(pc.invert(mask)), "review": review}, NO_DEAD_LETTERS)

    def _act_on_onset(self, reason: str) -> None:
        action = self.params["action"]
        if action == "stop":
            log.warning("%s: stopping (no more inputs are read)", reason)
            self.ctx.request_stop(reason)
        else:
            log.warning("%s: %s", reason, "rows go to review" if action == "divert" else "warning")


def _field(predicate: str) -> str:
    return parse_predicate(predicate)["field"]

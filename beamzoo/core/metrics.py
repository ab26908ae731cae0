"""What a run reports: per step and in all.

Every executor reports, for each step of the compiled graph: rows in, rows out,
dead letters, rows skipped (a resume's, without a dead letter), batches, wall
and CPU seconds in the step, and seconds waiting for input and for room
downstream. For every step ``rows_in = rows_out + dead + skipped``; ``ports``
says what each output port carried (a route's branches, a one-to-many step's
children and parents), and ``reasons`` counts the dead letters by their reason
(``reason_key``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

COUNTS = ("rows_in", "rows_out", "dead", "skipped", "batches")
TIMES = ("wall_s", "cpu_s", "wait_in_s", "wait_out_s")


@dataclass(slots=True)
class Sample:
    """One batch through one step."""

    rows_in: int = 0
    rows_out: int = 0
    dead: int = 0
    skipped: int = 0
    batches: int = 1
    wall_s: float = 0.0
    cpu_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    ports: dict | None = None
    reasons: list | None = None  # the dead letters' reasons


@dataclass
class StepMetrics:
    kind: str = ""
    rows_in: int = 0
    rows_out: int = 0
    dead: int = 0
    skipped: int = 0
    batches: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    ports: dict = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)

    def add(self, s: Sample) -> None:  # once a batch and step: spelt out, no getattr loop
        self.rows_in += s.rows_in
        self.rows_out += s.rows_out
        self.dead += s.dead
        self.skipped += s.skipped
        self.batches += s.batches
        self.wall_s += s.wall_s
        self.cpu_s += s.cpu_s
        self.wait_in_s += s.wait_in_s
        self.wait_out_s += s.wait_out_s
        for port, n in (s.ports or {}).items():
            self.ports[port] = self.ports.get(port, 0) + n
        if s.reasons:
            self.reasons.update(reason_key(r) for r in s.reasons)

    def merge(self, other: StepMetrics) -> None:
        for k in COUNTS + TIMES:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for port, n in other.ports.items():
            self.ports[port] = self.ports.get(port, 0) + n
        self.reasons.update(other.reasons)

    def commonest(self) -> tuple[str, int] | None:
        """The commonest reason of the step's dead letters and how many had it."""
        return self.reasons.most_common(1)[0] if self.reasons else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = dict(self.reasons.most_common())
        return d


def reason_key(error: str, limit: int = 100) -> str:
    """A dead letter's reason without what differs between inputs (sizes, offsets, a file's
    first bytes), so reasons can be counted: ``ValueError: image is NxN = N pixels, ...``."""
    text = error.split(" (", 1)[0]
    text = re.sub(r"b'[^']*'|b\"[^\"]*\"", "b'...'", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:limit]


@dataclass
class RunStats:
    """The counts of one run, per input: ``inputs = scored + failed + skipped + dropped``.

    ``inputs``: what the sources listed. Each input is counted once, however many rows it
    becomes, by following it through the graph (``beamzoo.core.executor.input_line``):
    ``failed``: inputs dead-lettered on the way (a child's dead letter, say one line of an
    OCR page, does not fail its input; its page is still answered); ``skipped``: inputs
    already done (a resume's); ``dropped``: inputs left on a port no step reads;
    ``scored``: the rest, the inputs whose rows reached a sink. A route sends a row down
    one branch; a one-to-many step's parents go on, not its children; where several steps
    read one port, the input is followed into the first that is not a sink (the others
    get copies, which add rows, not inputs). ``written`` has the rows of each sink
    (``dead_sinks``: those of dead letters), ``steps`` every step's ``StepMetrics``,
    ``stages`` how the steps were staged."""

    inputs: int = 0
    scored: int = 0
    failed: int = 0
    skipped: int = 0  # inputs already done (resume)
    dropped: int = 0  # inputs left on a port no step reads
    seconds: float = 0.0
    first_result_s: float | None = None
    written: dict = field(default_factory=dict)  # sink id -> rows
    dead_sinks: list = field(default_factory=list)  # the ids in written that write dead letters
    counters: dict = field(default_factory=dict)  # a step's own counts (a gate's rows held)
    stopped: str | None = None  # why the run stopped early (what was read is written)
    steps: dict = field(default_factory=dict)  # step id -> StepMetrics
    stages: list = field(default_factory=list)  # [{"stage", "kind", "steps", "placement"}]
    notes: dict = field(default_factory=dict)  # step id -> facts it noted (the providers asked for, say)
    runner: str = ""

    def line(self) -> str:
        """``inputs: N  scored: N  dead letters: N`` (and ``already done``, ``not written``),
        with the rows of the sinks where those counts do not tell them (several sinks of answers,
        an input that became many rows): ``rows: results 100, low_confidence 79``."""
        done = f"  already done: {self.skipped}" if self.skipped else ""
        dropped = f"  not written: {self.dropped}" if self.dropped else ""
        text = f"inputs: {self.inputs}  scored: {self.scored}  dead letters: {self.failed}{done}{dropped}"
        rows = {k: n for k, n in self.written.items() if k not in self.dead_sinks}
        if len(rows) < 2 and sum(rows.values()) == self.scored:
            rows = {}
        dead = {k: n for k, n in self.written.items() if k in self.dead_sinks}
        if sum(dead.values()) != self.failed and dead:
            rows.update(dead)
        return text + ("  rows: " + ", ".join(f"{k} {n}" for k, n in rows.items()) if rows else "")

    def profile(self) -> dict:
        """The run as JSON data: totals, stages and every step's metrics (``--profile FILE``)."""
        return {"beamzoo_profile": 1, "runner": self.runner, "inputs": self.inputs, "scored": self.scored,
                "failed": self.failed, "skipped": self.skipped, "dropped": self.dropped, "seconds": self.seconds,
                "first_result_s": self.first_result_s, "written": self.written, "counters": self.counters,
                "stopped": self.stopped, "stages": self.stages, "notes": self.notes,
                "steps": {k: v.to_dict() for k, v in self.steps.items()}}

    def write_profile(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.profile(), f, indent=1)
            f.write("\n")


__all__ = ["RunStats", "Sample", "StepMetrics", "reason_key"]

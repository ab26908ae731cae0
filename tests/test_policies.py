"""Per-record deadlines, with the run's clock injected (no sleeping): the policy alone, its
steps alone, and in a cascade on both local runners; two runs in one process keep their own clocks."""
from __future__ import annotations

import os

import pyarrow as pa
import pytest

from beamzoo import Cascade, Deadline, Manifest, Pipeline, Rows, WriteParquet
from beamzoo.core import RunContext
from beamzoo.transforms.deadline import DeadlineCheck, DeadlinePolicy
from conftest import read, run_graph
from test_cascade import SURE, UNSURE, models, write_colour_image


def test_the_policy_escalates_only_what_can_finish_in_time():
    policy = DeadlinePolicy(escalation_s=1.0)
    assert policy.can_escalate(deadline_at=101.0, now=100.0)  # exactly in time
    assert not policy.can_escalate(deadline_at=100.5, now=100.0)
    assert not policy.expired(deadline_at=100.0, now=100.0) and policy.expired(deadline_at=99.9, now=100.0)
    assert DeadlinePolicy().can_escalate(100.0, 100.0)


def test_each_run_context_has_its_own_clock():
    a, b, real = RunContext(clock=lambda: 42.0), RunContext(clock=lambda: 7.0), RunContext()
    assert (a.now(), b.now()) == (42.0, 7.0) and abs(real.now() - 42.0) > 1e6
    stamp_a, stamp_b = Deadline(seconds=1.0).bind(a), Deadline(seconds=1.0).bind(b)
    batch = Rows([{"id": "x"}]).to_batch(["0"]).ok
    assert stamp_a.process(batch).ok.column("deadline_at").to_pylist() == [43.0]
    assert stamp_b.process(batch).ok.column("deadline_at").to_pylist() == [8.0]


def test_deadline_stamps_each_row_and_the_check_dead_letters_late_rows():
    rows = Rows([{"id": "a", "budget_s": 5.0}, {"id": "b", "budget_s": None}, {"id": "c", "budget_s": -2.0}])
    batch = rows.to_batch(["0", "1", "2"]).ok
    clock = {"t": 100.0}
    ctx = RunContext(clock=lambda: clock["t"])
    stamp = Deadline(seconds=3.0, field="budget_s").bind(ctx)
    stamped = stamp.process(batch).ok
    assert stamped.column("deadline_at").to_pylist() == [105.0, 103.0, 98.0]
    clock["t"] = 104.0  # four seconds later
    ok, dead = DeadlineCheck(before="infer").bind(ctx).process(stamped)
    assert ok.column("id").to_pylist() == ["a"]
    assert dead.column("id").to_pylist() == ["b", "c"] and set(dead.column("stage").to_pylist()) == {"deadline"}
    assert dead.column("error").to_pylist()[0] == "DeadlineMissed: the deadline passed 1.000 s ago before infer answered"


def test_a_deadline_field_must_be_a_numeric_column():
    with pytest.raises(Exception, match="Deadline step 'deadline': field 'nope' must be a numeric column"):
        Pipeline() | Rows([{"x": 1}]) | Deadline(field="nope")


@pytest.mark.parametrize("runner", ["EdgeRunner", "DirectRunner"])
def test_in_a_cascade_late_rows_keep_the_fast_answer_and_expired_ones_dead_letter(tmp_path, runner):
    fast, strong = models(tmp_path)
    d = tmp_path / "imgs"
    d.mkdir()
    budgets = {"reddish": 5.0, "greenish": 0.5, "bluish": -1.0, "red": 0.5, "green": -1.0}
    for name in budgets:
        write_colour_image(d / f"{name}.png", {**SURE, **UNSURE}[name])
    table = pa.table({"uri": [str(d / f"{n}.png") for n in budgets], "name": list(budgets),
                      "budget_s": list(budgets.values())})
    import pyarrow.csv as csv
    csv.write_csv(table, tmp_path / "manifest.csv")
    p = Pipeline()
    (p | Manifest(str(tmp_path / "manifest.csv")) | Deadline(seconds=10, field="budget_s")
     | Cascade(fast, strong, below=0.9, topk=2, escalation_s=1.0) | WriteParquet(tmp_path / "out" / "answers"))
    p.dead_letters | WriteParquet(tmp_path / "out" / "dead", id="dead")
    stats = run_graph(p.graph, runner, clock=lambda: 1000.0)  # time stands still: only the budgets decide
    rows = {r["name"]: r for r in read(tmp_path / "out", "answers")}
    dead = read(tmp_path / "out", "dead")
    assert (stats.inputs, stats.scored, stats.failed) == (5, 3, 2)
    assert sorted(os.path.basename(x["source"]) for x in dead) == ["bluish.png", "green.png"]
    assert {x["stage"] for x in dead} == {"deadline"}
    assert {n: (r["escalation"], r["model"]) for n, r in rows.items()} == {
        "reddish": ("escalated", "tiny_strong:1"),   # unsure, and time to ask the strong model
        "greenish": ("deadline", "tiny_colour:1"),   # unsure, but 0.5 s left and an escalation takes 1 s
        "red": ("not_needed", "tiny_colour:1")}
    assert rows["greenish"]["label"] == rows["greenish"]["fast_label"] == "green"
    assert rows["reddish"]["deadline_at"] == 1005.0

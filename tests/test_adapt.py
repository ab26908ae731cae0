"""--adapt: the controller driven with injected batches (deterministic), the edge runner moving a
step's batch size as its inputs get slower, and a server moving its batch size (real sockets)."""
from __future__ import annotations

import inspect
import os
import re

import pytest

from beamzoo.core import Operator, register
from beamzoo.core.adapt import MAX_PATIENCE, WINDOW, Adapter, Lever, check_budgets, ladder
from beamzoo.core.context import RunContext
from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.metrics import Sample
from beamzoo.core.op import NO_DEAD_LETTERS, Result
from beamzoo.pipeline import Pipeline
from beamzoo.runners.edge import EdgeRunner
from beamzoo.serve.client import Client
from beamzoo.serve.knobs import SERVER_KNOBS
from beamzoo.serve.models import Servable
from beamzoo.serve.server import Server
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files
from conftest import tiny_card, tiny_colour_model, write_colour_image

K = WINDOW
SIZE = Knob(16, int, low=1, high=64, results=False, tune=(1, 2, 4, 8, 16, 32), doc="rows per call")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Drive:
    """An adapter with one batch-size lever for step ``infer``, fed batches whose seconds per row
    ``latency(batch size)`` says; the clock moves a second a batch."""

    def __init__(self, latency, budgets=None, start=16):
        self.latency, self.clock, self.lines = latency, Clock(), []
        self.ctx = RunContext("adapt-test", clock=self.clock)
        self.applied = []
        self.lever = Lever("batch_size", SIZE, start, self.applied.append, steps=("infer",))
        self.adapter = Adapter([self.lever], budgets, say=self.lines.append)
        self.ctx.hooks.append(self.adapter)
        self.feed(1)  # the warm-up batch, not counted

    def feed(self, n: int, step: str = "infer", kind: str = "map") -> None:
        for _ in range(n):
            rows = 4
            self.ctx.record(step, kind, Sample(rows, rows, wall_s=rows * self.latency(self.lever.value)))
            self.clock.t += 1

    @property
    def moves(self) -> list[tuple]:
        return [(c.old, c.new, c.reason) for c in self.adapter.changes]


def ms(x):
    return x / 1000


# ---------------------------------------------------------------- the controller

def test_over_its_budget_for_a_window_one_speed_knob_moves_one_value():
    d = Drive(lambda size: ms(size), budgets={"infer": ms(10)})  # 16 ms a row at 16: 1.6 x the budget
    d.feed(K - 1)
    assert d.adapter.changes == [] and d.applied == []
    d.feed(1)
    assert d.moves == [(16, 8, "over its budget")] and d.applied == [8] and d.lever.value == 8
    assert d.lines == ["adapt: infer over its budget (16 ms/row > 10 ms for 8 batches): batch_size 16 -> 8"]
    assert d.ctx.counters["adapt changes"] == 1
    (note,) = d.ctx.notes["infer"]["adapt"]
    assert note == {"knob": "batch_size", "from": 16, "to": 8, "reason": "over its budget", "ms_per_row": 16.0,
                    "budget_ms": 10.0, "batch": K, "at_s": float(K)}
    assert d.ctx.notes["infer"]["adapt budget_s"] == ms(10)
    d.feed(4 * K)  # 8 ms a row at 8: within the budget, the move kept, nothing more to do
    assert d.moves == [(16, 8, "over its budget")] and d.lever.value in SIZE.candidates(4)


def test_at_most_one_change_a_window_while_it_stays_over():
    d = Drive(lambda size: ms(size), budgets={"infer": ms(0.1)})  # never within it
    d.feed(2 * K - 1)
    assert len(d.adapter.changes) == 1
    d.feed(1)
    assert d.moves == [(16, 8, "over its budget"), (8, 4, "over its budget")]
    batches = [c.batch for c in d.adapter.changes]
    assert batches == [K, 2 * K]


def test_well_under_its_budget_the_move_is_undone():
    d = Drive(lambda size: ms(16 if size >= 16 else 4), budgets={"infer": ms(10)})  # 8: 0.4 x the budget
    d.feed(K)
    d.feed(K)  # judged: it helped, kept
    assert d.moves == [(16, 8, "over its budget")]
    d.feed(K)
    assert d.moves == [(16, 8, "over its budget"), (8, 16, "well under its budget")]
    assert d.lines[-1] == ("adapt: infer well under its budget (4 ms/row < 0.5 x 10 ms for 8 batches): "
                           "batch_size 8 -> 16")
    assert d.lever.value == 16  # back where it started, never beyond it toward efficiency


def test_it_does_not_flap():
    """16 is over the budget and 8 well under it: each move back and forth waits twice as long as
    the one before, up to MAX_PATIENCE windows."""
    d = Drive(lambda size: ms(16 if size >= 16 else 4), budgets={"infer": ms(10)})
    d.feed(60 * K)
    downs = [c.batch for c in d.adapter.changes if c.reason == "over its budget"]
    cycles = [b - a for a, b in zip(downs, downs[1:])]  # down, kept, back up: three decisions a cycle
    assert cycles == [3 * K * 1, 3 * K * 2, 3 * K * 4, 3 * K * MAX_PATIENCE], cycles
    assert len(d.adapter.changes) == 9  # 40 without the waits
    assert set(d.applied) == {8, 16}


def test_a_move_that_does_not_help_is_undone_and_the_other_way_tried():
    d = Drive(lambda size: ms(160 / size), budgets={"infer": ms(8)})  # here a smaller batch is slower
    d.feed(4 * K)  # a try that failed: two windows before the next
    assert d.moves == [(16, 8, "over its budget"), (8, 16, "did not help"), (16, 32, "over its budget")]
    assert [c.batch for c in d.adapter.changes] == [K, 2 * K, 4 * K]
    assert d.lines[1] == "adapt: infer did not help (20 ms/row, 10 ms before): batch_size 8 -> 16"
    d.feed(6 * K)  # 5 ms a row at 32: within it
    assert d.lever.value == 32 and len(d.moves) == 3


def test_never_beyond_the_declared_values():
    d = Drive(lambda size: ms(size), budgets={"infer": ms(0.01)})
    d.feed(20 * K)
    assert d.applied == [8, 4, 2, 1]  # each helped, none was enough
    assert min(d.applied) >= min(SIZE.candidates(4)) and d.lever.values == (1, 2, 4, 8, 16, 32)
    stuck = [line for line in d.lines if "no speed knob can move further" in line]
    assert len(stuck) == 1, d.lines  # said once


def test_a_knob_that_changes_results_is_refused():
    with pytest.raises(KnobError, match="adapt: model changes results; only speed knobs"):
        Lever("model", OnnxInference.knobs["model"], "m:1", apply=print)
    with pytest.raises(KnobError, match="adapt: keep_input changes results"):
        Lever("keep_input", OnnxInference.knobs["keep_input"], False, apply=print)
    lever = Lever("batch_size", OnnxInference.knobs["batch_size"], 4, apply=print)  # a speed knob
    assert lever.values == (1, 2, 4, 8, 16, 32)


def test_without_budgets_the_first_window_sets_them():
    slow = {"on": False}
    d = Drive(lambda size: ms(size * (3 if slow["on"] else 1)))
    d.feed(K)
    assert d.adapter.changes == [] and d.ctx.notes["infer"]["adapt budget_s"] == pytest.approx(ms(24))
    d.feed(2 * K)
    assert d.adapter.changes == []
    assert d.lines == ["adapt: infer has no budget: keeping it within 1.5 x its first 8 batches' 16 ms/row = "
                       "24 ms/row"]
    slow["on"] = True  # larger inputs: 48 ms a row at 16
    d.feed(K)
    assert d.moves == [(16, 8, "over its budget")]
    d.feed(4 * K)  # 24 ms a row: within it
    assert d.moves == [(16, 8, "over its budget")]


def test_without_budgets_only_map_like_steps_slow_enough_to_time_are_kept_to_one():
    lines = []
    ctx = RunContext("which")
    a = Adapter([Lever("batch_size", SIZE, 16, print, steps=("infer", "tiny", "out", "small"))], say=lines.append)
    ctx.hooks.append(a)
    for i in range(6 * K):
        ctx.record("other", "map", Sample(4, 4, wall_s=ms(40)))  # no lever moves its latency
        ctx.record("out", "sink", Sample(4, 4, wall_s=ms(40)))  # a sink gets no budget of its own
        ctx.record("tiny", "map", Sample(4, 4, wall_s=ms(0.5)))  # too quick to time
        ctx.record("small", "map", Sample(4, 4, wall_s=ms(3 if i < 2 * K else 30)))  # a small part of the time
        ctx.record("infer", "map", Sample(4, 4, wall_s=ms(40)))
    assert list(a.steps) == ["small", "infer"] and a.quick == {"tiny"}
    assert lines == ["adapt: infer has no budget: keeping it within 1.5 x its first 8 batches' 10 ms/row = "
                     "15 ms/row"]  # small has one too (in the notes), but it is left alone
    assert a.changes == []  # small got ten times slower, but it was less than a tenth of the time


def test_steps_sharing_a_lever_move_it_one_window_at_a_time():
    moved = []
    chunk = Lever("chunk_size", EdgeRunner.knobs["chunk_size"], 16, moved.append)  # serves every step
    ctx = RunContext("shared")
    a = Adapter([chunk], {"a": ms(1), "b": ms(1)}, say=lambda line: None)
    ctx.hooks.append(a)
    for _ in range(1 + 2 * K):  # a warm-up batch each, then two windows
        for step in ("a", "b"):
            ctx.record(step, "map", Sample(1, 1, wall_s=ms(5)))
    steps = [c.step for c in a.changes]
    assert steps == ["a", "a"], steps  # b's window began again at each of a's changes
    assert moved == [8, 16] and chunk.values == (4, 8, 16, 32, 64)


def test_ladders_and_budgets_are_checked():
    assert ladder(EdgeRunner.knobs["chunk_size"], 1) == (1, 2, 4)
    assert ladder(SERVER_KNOBS["max_delay_ms"], 3.0) == (0.0, 2.0, 3.0, 5.0, 10.0, 20.0)
    assert ladder(SERVER_KNOBS["workers"], 3, cores=4) == (1, 2, 3, 4, 8)
    assert check_budgets("x", {"classify/infer": 0.004}) == {"classify/infer": 0.004}
    with pytest.raises(KnobError, match=r"^EdgeRunner: budgets: classify/infer must be a positive number of "
                                        r"seconds per row, got -1$"):
        EdgeRunner(adapt=True, budgets={"classify/infer": -1})
    with pytest.raises(KnobError, match="Server: budgets: step ids are text, got 3"):
        Server([], budgets={3: 0.1})


def test_the_server_declares_budgets_as_a_knob_but_no_flag():
    assert "budgets" in Server.knobs and "budgets" not in SERVER_KNOBS
    assert Server.knobs["budgets"].results is False
    assert "budgets" in inspect.signature(Server).parameters and "budgets =" in Server.__doc__


# ---------------------------------------------------------------- the edge runner

SEEN: list[int] = []


@register("test_adapt_slow")
class Slow(Operator):
    """Passes its rows on; by its own account a row takes 1 ms x its batch size (3 x that for a
    file named big*), whatever the machine."""

    default_id = "slow"
    knobs = {"batch_size": SIZE}

    def configure(self):
        self.batch_size = self.params["batch_size"]

    def process(self, batch):
        SEEN.append(self.batch_size)
        paths = batch.column("path").to_pylist()
        self.ctx.took = sum(ms(self.batch_size) * (3 if os.path.basename(p).startswith("big") else 1)
                            for p in paths)
        return Result(batch, NO_DEAD_LETTERS)


class Timed(RunContext):
    """A run whose step ``slow`` takes the time it says it took (the other steps, the real time)."""

    took = 0.0

    def record(self, step, kind, sample):
        if step == "slow" and sample.batches:
            sample.wall_s = self.took
        super().record(step, kind, sample)


def slow_run(tmp_path, names, **knobs):
    d = tmp_path / "in"
    d.mkdir()
    for name in names:
        (d / name).write_text(name)
    p = Pipeline()
    p | Files(str(d / "*")) | Slow() | WriteParquet(str(tmp_path / "out"))
    SEEN.clear()
    knobs.setdefault("adapt", True)
    runner = EdgeRunner(workers=1, chunk_size=4, progress=False, **knobs)
    return runner.run(p.graph, Timed("edge-adapt"))


def test_the_edge_runner_moves_a_step_s_batch_size_and_says_so(tmp_path, capfd):
    stats = slow_run(tmp_path, [f"a{i:03}" for i in range(96)], budgets={"slow": ms(10)})
    assert sum(stats.written.values()) == 96 and stats.scored == 96
    assert SEEN == [16] * (1 + K) + [8] * (24 - 1 - K)  # a warm-up batch, a window over, then the new size
    assert stats.counters["adapt changes"] == 1
    (change,) = stats.notes["slow"]["adapt"]
    assert (change["knob"], change["from"], change["to"], change["reason"]) == ("batch_size", 16, 8,
                                                                                "over its budget")
    assert stats.profile()["counters"]["adapt changes"] == 1  # --profile lists it too
    err = capfd.readouterr().err
    assert "adapt: slow over its budget (16 ms/row > 10 ms for 8 batches): batch_size 16 -> 8" in err


def test_the_edge_runner_without_budgets_keeps_to_its_first_batches(tmp_path, capfd):
    """The second half of the inputs are three times slower: the batch size comes down once."""
    stats = slow_run(tmp_path, [f"a{i:03}" for i in range(48)] + [f"big{i:03}" for i in range(48)])
    assert stats.counters["adapt changes"] == 1
    assert SEEN == [16] * (1 + 2 * K) + [8] * (24 - 1 - 2 * K)
    err = capfd.readouterr().err
    assert "adapt: slow has no budget: keeping it within 1.5 x its first 8 batches' 16 ms/row = 24 ms/row" in err
    assert "adapt: slow over its budget (36 ms/row > 24 ms for 8 batches): batch_size 16 -> 8" in err


def test_the_edge_runner_without_adapt_moves_nothing(tmp_path):
    stats = slow_run(tmp_path, [f"a{i:03}" for i in range(40)], adapt=False, budgets={"slow": ms(1)})
    assert SEEN == [16] * 10 and "adapt changes" not in stats.counters


# ---------------------------------------------------------------- the server

def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_the_server_moves_its_batch_size_down_and_shows_it_in_metrics(tmp_path, capfd):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    red = open(write_colour_image(tmp_path / "r.png", (230, 20, 20)), "rb").read()
    blue = open(write_colour_image(tmp_path / "b.png", (20, 20, 230)), "rb").read()
    running = Server([Servable.from_model(card)], max_batch=8, max_delay_ms=2, workers=1, adapt=True,
                     budgets={"classify/infer": 1e-9}).start()  # no step is that quick
    try:
        service = running.server.service_for("tiny_colour")
        with Client(running.url) as c:
            for _ in range(1 + K):  # one row a request, one batch each: a warm-up, a window over the budget
                assert c.predict("tiny_colour", [red])[0]["label"] == "red"
            assert service.loop.batcher.max_batch == 4
            before = c.request("GET", "/metrics")[1]
            five = c.predict("tiny_colour", [red, blue, red, blue, red])  # now cut in batches of 4 and 1
            text = c.request("GET", "/metrics")[1]
    finally:
        running.stop()
    assert [p["label"] for p in five] == ["red", "blue", "red", "blue", "red"]
    assert metric(text, "beamzoo_adapt_changes_total", model="tiny_colour", knob="max_batch") == 1
    assert metric(text, "beamzoo_adapt_changes_total", knob="max_delay_ms") == 0
    assert metric(text, "beamzoo_batch_rows_count") - metric(before, "beamzoo_batch_rows_count") == 2
    (change,) = service.adapter.changes
    assert (change.step, change.knob, change.old, change.new) == ("classify/infer", "max_batch", 8, 4)
    assert "beamzoo serve: tiny_colour:1: adapt: classify/infer over its budget" in capfd.readouterr().err


def test_a_server_without_adapt_has_no_adapter_and_no_series(tmp_path):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    server = Server([Servable.from_model(card)], workers=1)
    try:
        assert server.service_for().adapter is None and b"beamzoo_adapt_changes" not in server.metrics.text()
    finally:
        server.close()

"""A run's summary line counts inputs, once each, on every runner: a route and a merge, a port
read by two steps, a one-to-many step with or without a collect."""
from __future__ import annotations

import pyarrow as pa
import pytest

from beamzoo.core import register
from beamzoo.core.graph import GraphBuilder
from beamzoo.core.knobs import Knob
from beamzoo.core.metrics import RunStats
from beamzoo.core.op import Result, RowOperator, dead_letters
from beamzoo.transforms.flow import Collect, Explode, Merge, Route
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Rows
from conftest import read, run_graph

N = 20  # rows 0..19; score i/20; words "w0 .. w{i % 4}"


@register
class FailEvery(RowOperator):
    """Dead-letters the rows whose ``n`` is a multiple of ``every``."""

    name = "test_fail_every"
    default_id = "fail"
    requires = pa.schema([pa.field("n", pa.int64())])
    produces = pa.schema([pa.field("half", pa.float64())])
    knobs = {"every": Knob(5, int, doc="which rows fail")}
    positional = ("every",)

    def process_row(self, row):
        if row["n"] % self.params["every"] == 0:
            raise ValueError(f"row {row['n']} is refused")
        return {"half": row["n"] / 2}


@register
class Words(Explode):
    """One row -> a child per word of its ``text``; a text with ``bad`` is a dead letter."""

    name = "test_words"
    default_id = "words"
    consumes = ()
    requires = pa.schema([pa.field("text", pa.string())])
    produces = pa.schema([pa.field("parent_id", pa.string()), pa.field("child", pa.int32()),
                          pa.field("n", pa.int64())])

    def produced(self, inputs):
        return ["parent_id", "child"]  # the children's own rows: their n is a new column

    def output_schemas(self, inputs):
        (schema,) = inputs
        return {"out": pa.schema([pa.field("id", pa.string(), nullable=False), *self.produces]),
                "parents": pa.schema([*schema, pa.field("children", pa.int32())])}

    def process_pieces(self, batch):
        yield self.process(batch)

    def process(self, batch):
        rows, parents, counts, bad = [], [], [], []
        for i, (rid, text) in enumerate(zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())):
            if "bad" in text:
                bad.append(i)
                continue
            words = text.split()
            parents.append(i)
            counts.append(len(words))
            rows += [{"id": f"{rid}#{k}", "parent_id": rid, "child": k, "n": int(w[1:])}
                     for k, w in enumerate(words)]
        schemas = self.output_schemas([batch.schema])
        kept = batch.take(pa.array(parents, pa.int64()))
        kept = kept.append_column(schemas["parents"].field("children"), pa.array(counts, pa.int32()))
        return Result({"out": pa.RecordBatch.from_pylist(rows, schema=schemas["out"]), "parents": kept},
                      dead_letters(batch, bad, self.id, ["ValueError: bad text"] * len(bad)))


def rows():
    return [{"id": f"r{i:02d}", "n": i, "score": i / N,
             "text": "bad" if i == 7 else " ".join(f"w{k}" for k in range(i % 4 + 1))} for i in range(N)]


def dead_sink(b, out):
    b.dead_letters | WriteParquet(out / "dead_letter", id="write_dead_letters")


def route_and_merge(out):
    """4 rows die (n = 0, 5, 10, 15); of the 16 left, 8 score below 0.5 (n = 1..9 less 5):
    those go to ``low_confidence`` and, with the rest, to ``results``."""
    b = GraphBuilder()
    branches = b | Rows(rows()) | FailEvery(5) | Route(low="score < 0.5")
    branches.low | WriteParquet(out / "low_confidence", id="low_confidence")
    (branches.low, branches.otherwise) | Merge() | WriteParquet(out / "results", id="results")
    dead_sink(b, out)
    return b.graph


def two_sinks(out):
    """A port read by two sinks: every input is written twice, counted once."""
    b = GraphBuilder()
    rows_ = b | Rows(rows()) | FailEvery(5)
    rows_ | WriteParquet(out / "results", id="results")
    rows_ | WriteParquet(out / "copy", id="copy")
    dead_sink(b, out)
    return b.graph


def explode_collect(out):
    """Row 7 dies whole; the words with n % 3 == 0 die (children): their rows are still answered."""
    b = GraphBuilder()
    words = b | Rows(rows()) | Words()
    kids = words.out | FailEvery(3, id="kid_fail")
    (kids, words.parents) | Collect(["half"]) | WriteParquet(out / "results", id="results")
    dead_sink(b, out)
    return b.graph


def explode_children_only(out):
    """The children written, their parents read by nobody: each input counted once."""
    b = GraphBuilder()
    (b | Rows(rows()) | Words()).out | WriteParquet(out / "words", id="words_out")
    dead_sink(b, out)
    return b.graph


def unread_branch(out):
    """A route's branch that no step reads: its rows are not written, and the line says so."""
    b = GraphBuilder()
    branches = b | Rows(rows()) | Route(low="score < 0.25")
    branches.otherwise | WriteParquet(out / "results", id="results")
    return b.graph


# the children: row i has i % 4 + 1 words, n = 0 .. i % 4, of which n = 0 and 3 die
WORDS = sum(i % 4 + 1 for i in range(N) if i != 7)
KID_DEAD = sum(1 + (i % 4 == 3) for i in range(N) if i != 7)
CASES = {
    "route_and_merge": (route_and_merge,
                        "inputs: 20  scored: 16  dead letters: 4  rows: low_confidence 8, results 16"),
    "two_sinks": (two_sinks, "inputs: 20  scored: 16  dead letters: 4  rows: results 16, copy 16"),
    "explode_collect": (explode_collect, f"inputs: 20  scored: 19  dead letters: 1  rows: write_dead_letters "
                                         f"{1 + KID_DEAD}"),
    "explode_children_only": (explode_children_only,
                              f"inputs: 20  scored: 19  dead letters: 1  rows: words_out {WORDS}"),
    "unread_branch": (unread_branch, "inputs: 20  scored: 15  dead letters: 0  not written: 5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_line_counts_each_input_once(tmp_path, runner, case):
    build, line = CASES[case]
    stats = run_graph(build(tmp_path), runner)
    assert stats.line() == line
    assert stats.inputs == stats.scored + stats.failed + stats.skipped + stats.dropped
    for sink, n in stats.written.items():  # the rows per sink are those in its files
        folder = {"write_dead_letters": "dead_letter", "words_out": "words"}.get(sink, sink)
        assert len(read(tmp_path, folder)) == n


def test_a_collect_answers_each_parent_with_its_live_children(tmp_path, runner):
    run_graph(explode_collect(tmp_path), runner)
    got = {r["id"]: r["half"] for r in read(tmp_path, "results")}
    assert len(got) == 19 and "r07" not in got
    assert got["r03"] == got["r02"] == [0.5, 1.0] and got["r00"] == []  # n = 0 and 3 die


def test_the_line_of_a_plain_run_is_the_three_counts():
    s = RunStats(inputs=9, scored=7, failed=2, written={"write": 7, "dead": 2}, dead_sinks=["dead"])
    assert s.line() == "inputs: 9  scored: 7  dead letters: 2"
    s = RunStats(inputs=9, scored=0, skipped=9, written={"write": 0})
    assert s.line() == "inputs: 9  scored: 0  dead letters: 0  already done: 9"

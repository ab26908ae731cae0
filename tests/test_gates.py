"""Drift and bias gates: the metrics and the gate as state machines, the refusals, and
real photographs followed by noise images through the real model (warn, divert, stop)."""
from __future__ import annotations

import logging
import os
import shutil

import cv2
import numpy as np
import pyarrow as pa
import pytest

from beamzoo import Classify, EdgeRunner, Files, Gate, GraphError, Manifest, Pipeline, Rows, WriteParquet
from beamzoo.core import KnobError
from beamzoo.gates import label_profile, load_profile, save_profile, with_gates
from beamzoo.transforms.gate import Bias, FractionBelow, GateState, LabelDistance, MeanConfidence, parse_gate
from beamzoo.samples import sample_files
from conftest import FLINK, read, run_graph

N_PHOTOS, N_NOISE = 12, 40


def test_the_metrics_over_a_sliding_window():
    m = MeanConfidence(3)
    assert [m.push({"score": s}) for s in (0.9, 0.6, 0.3, 0.0)] == [None, None, pytest.approx(0.6),
                                                                    pytest.approx(0.3)]
    f = FractionBelow(4, below=0.5)
    assert [f.push({"score": s}) for s in (0.9, 0.1, 0.2, 0.8, 0.3)] == [None, None, None, 0.5, 0.75]
    ref = {"cat": 0.5, "dog": 0.5}
    d = LabelDistance(4, ref)
    values = [d.push({"label": x}) for x in ("cat", "dog", "cat", "dog", "car", "car", "car", "car")]
    assert values[:3] == [None] * 3 and values[3] == pytest.approx(0.0)
    assert values[5] == pytest.approx(0.5) and values[7] == pytest.approx(1.0)  # all cars: nothing alike
    b = Bias(6, "group", lambda r: r["score"] >= 0.5, min_group=2)
    rows = [("a", 0.9), ("b", 0.9), ("a", 0.9), ("b", 0.1), ("a", 0.1), ("b", 0.1)]
    out = [b.push({"group": g, "score": s}) for g, s in rows]
    assert out[:5] == [None] * 5 and out[5] == pytest.approx((1 / 3) / (2 / 3))


def test_the_gate_counts_rows_held_and_onsets():
    g = GateState({"metric": "mean_confidence", "window": 2, "op": "<", "bound": 0.5})
    pushed = [g.push({"score": s})[1] for s in (0.9, 0.8, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1)]
    assert pushed == [False, False, True, True, False, False, False, True]  # means -, .85, .45, .1, .5, .9, .5, .1
    assert (g.held, g.onsets) == (3, 2)


def test_gate_specs_parse_and_bad_ones_are_refused():
    assert parse_gate("mean_confidence<0.3:stop") == {"metric": "mean_confidence", "op": "<", "bound": 0.3,
                                                      "action": "stop"}
    assert parse_gate(" fraction_below(0.2) >= 0.5 : divert") == {
        "metric": "fraction_below", "op": ">=", "bound": 0.5, "action": "divert", "below": 0.2}
    assert parse_gate("bias(region, label == cat)<0.8") == {
        "metric": "bias", "op": "<", "bound": 0.8, "action": "warn", "group": "region", "rate": "label == cat"}
    with pytest.raises(KnobError, match="cannot read the gate 'confidence is low'"):
        parse_gate("confidence is low")
    with pytest.raises(KnobError, match=r"fraction_below takes a number, got 'x'"):
        parse_gate("fraction_below(x)>0.5")


def test_unknown_metrics_actions_and_missing_columns_are_refused_when_built():
    src = Pipeline() | Rows([{"score": 0.5, "label": "cat"}])
    with pytest.raises(KnobError, match="Gate: metric must be one of mean_confidence, fraction_below, "
                                        "label_distance, bias, got 'mean_score'"):
        src | Gate(**parse_gate("mean_score<0.3:stop"))
    with pytest.raises(KnobError, match="Gate: action must be one of warn, divert, stop, got 'explode'"):
        src | Gate(**parse_gate("mean_confidence<0.3:explode"))
    with pytest.raises(KnobError, match="Gate step 'drift': label_distance needs a reference profile"):
        src | Gate(metric="label_distance", id="drift")
    with pytest.raises(Exception, match=r"Gate step 'gate' \(bias\(region\)<0.8:warn\) reads region, which its "
                                        "input lacks"):
        src | Gate(**parse_gate("bias(region)<0.8"), spec="bias(region)<0.8:warn")
    with pytest.raises(KnobError, match="Gate: window must be between 1 and 1000000, got 0"):
        src | Gate(window=0)


def test_profiles_round_trip_and_a_bad_file_is_refused(tmp_path):
    p = label_profile(["cat", "dog", "cat", "cat"])
    assert p["labels"] == {"cat": 0.75, "dog": 0.25} and p["rows"] == 4
    (tmp_path / "bad.json").write_text('{"labels": []}')
    with pytest.raises(KnobError, match="is not a label profile"):
        load_profile(str(tmp_path / "bad.json"))


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    """The sample photographs, then noise images (the model is unsure of them all), in that
    order by name; and a manifest of them with the group of each."""
    d = tmp_path_factory.mktemp("drift")
    photos = sorted(sample_files())[:N_PHOTOS]
    for i, f in enumerate(photos):
        shutil.copy(f, d / f"a{i:02d}_{os.path.basename(f)}")
    rng = np.random.default_rng(0)
    for i in range(N_NOISE):
        cv2.imwrite(str(d / f"z{i:03d}_noise.png"), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    names = sorted(os.listdir(d))
    table = pa.table({"uri": [str(d / n) for n in names], "group": ["noise" if "noise" in n else "photo"
                                                                     for n in names]})
    import pyarrow.csv as csv
    csv.write_csv(table, d.parent / "drift.csv")
    return d


def in_order():
    return EdgeRunner(workers=1, chunk_size=4, progress=False)  # rows reach the gate in listing order


def gated(source, out, *gates, reference=None, **extra):
    p = Pipeline()
    preds = p | source | Classify("efficientnet_lite0", topk=1)
    kw = [{**parse_gate(g), "window": 12, "spec": g, **({"reference": reference} if reference else {}), **extra}
          for g in gates]
    with_gates(preds, kw, str(out / "review")) | WriteParquet(out / "predictions")
    p.dead_letters | WriteParquet(out / "dead_letter", id="dead")
    return p.graph


def test_warn_logs_and_counts_when_the_photos_give_way_to_noise(tmp_path, drifting, caplog):
    with caplog.at_level(logging.WARNING, logger="beamzoo.gates"):
        stats = run_graph(gated(Files(str(drifting)), tmp_path, "mean_confidence<0.2:warn"), edge=in_order())
    assert stats.inputs == stats.scored == N_PHOTOS + N_NOISE
    held = stats.counters["gate_held"]
    assert N_NOISE - 12 <= held <= N_NOISE  # once most of the window is noise, to the end
    lines = [r.getMessage() for r in caplog.records if "gate 'gate'" in r.getMessage()]
    assert len(lines) == 1 and "mean_confidence = 0.1" in lines[0] and "over the last 12 rows" in lines[0]


def test_divert_sends_the_drifted_rows_to_review(tmp_path, drifting):
    stats = run_graph(gated(Files(str(drifting)), tmp_path, "mean_confidence<0.2:divert"), edge=in_order())
    review, kept = read(tmp_path, "review"), read(tmp_path, "predictions")
    assert len(review) + len(kept) == stats.inputs == N_PHOTOS + N_NOISE
    assert review and all("noise" in r["id"] for r in review)  # no photo is sent to review
    assert len(review) >= N_NOISE - 12 and all(r["review_reason"].startswith("gate 'gate'") for r in review)
    assert all("review_reason" not in r for r in kept)


def test_stop_ends_the_run_cleanly_keeping_what_was_written(tmp_path, drifting):
    stats = run_graph(gated(Files(str(drifting)), tmp_path, "mean_confidence<0.2:stop"), edge=in_order())
    assert stats.stopped.startswith("gate 'gate' (mean_confidence<0.2:stop): mean_confidence = 0.1")
    assert stats.inputs < N_PHOTOS + N_NOISE  # it read no more once the gate fired
    assert len(read(tmp_path, "predictions")) == stats.scored == stats.inputs  # all read were committed
    assert not [f for f in os.listdir(tmp_path / "predictions") if f.startswith(".")]


@pytest.mark.parametrize("beam_runner", ["DirectRunner", FLINK])
def test_a_beam_runner_refuses_a_stop_gate_and_runs_a_divert_one(tmp_path, drifting, beam_runner):
    with pytest.raises(GraphError, match="step 'gate' .*mean_confidence<0.2:stop.* needs the edge runner"):
        run_graph(gated(Files(str(drifting)), tmp_path / "stop", "mean_confidence<0.2:stop"), beam_runner)
    stats = run_graph(gated(Files(str(drifting)), tmp_path / "d", "fraction_below(0.2)>0.5:divert"),
                      beam_runner)
    review = read(tmp_path / "d", "review")
    assert len(review) + len(read(tmp_path / "d", "predictions")) == stats.inputs == 52
    assert stats.counters.get("gate_held", 0) == len(review)  # Beam's metrics carry the gate's count


def test_bias_compares_a_rate_across_the_groups_of_a_manifest_column(tmp_path, drifting):
    manifest = str(drifting.parent / "drift.csv")
    kw = dict(window=24, min_group=6)  # windows that hold 6 photos and 6 noise images or more
    stats = run_graph(gated(Manifest(manifest), tmp_path / "b", "bias(group, score>=0.2)<0.5:warn", **kw),
                      edge=in_order())
    # full windows (rows 23 on) with 6 photos or more (up to row 29): 7 rows; noise never scores 0.2
    assert stats.counters["gate_held"] == 7
    even = run_graph(gated(Manifest(manifest), tmp_path / "c", "bias(group, score>=0.0)<0.5:warn", **kw),
                     edge=in_order())
    assert even.counters["gate_held"] == 0  # a rate every group meets: no bias


def test_label_distance_against_a_profile_saved_from_an_earlier_run(tmp_path, drifting):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted(drifting.glob("a*")):
        shutil.copy(f, photos / f.name)
    run_graph(gated(Files(str(photos)), tmp_path / "ref"), edge=in_order())
    save_profile(str(tmp_path / "ref" / "predictions"), str(tmp_path / "profile.json"))
    reference = load_profile(str(tmp_path / "profile.json"))
    same = run_graph(gated(Files(str(photos)), tmp_path / "same", "label_distance>0.5:warn", reference=reference),
                     edge=in_order())
    assert same.counters["gate_held"] == 0  # the very photos: distance 0
    drift = run_graph(gated(Files(str(drifting)), tmp_path / "drift", "label_distance>0.5:divert",
                            reference=reference), edge=in_order())
    review = read(tmp_path / "drift", "review")
    assert drift.counters["gate_held"] == len(review) >= N_NOISE - 12 and all("noise" in r["id"] for r in review)

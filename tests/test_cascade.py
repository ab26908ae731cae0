"""The cascade: a fast model on every row, a strong one (with its own preprocessing) on
the rows the fast one is unsure of, one answer per input on every runner; the
threshold chosen on a calibration sample; bad cascades refused when built."""
from __future__ import annotations

import os

import pytest

from beamzoo import Cascade, Files, Graph, Pipeline, WriteParquet
from beamzoo.cascade import calibrate, outcomes
from beamzoo.core import KnobError, compile
from conftest import assert_same_rows, read, run_graph, tiny_card, tiny_colour_model, write_colour_image

SURE = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
UNSURE = {"reddish": (130, 110, 100), "greenish": (105, 125, 100), "bluish": (100, 110, 128)}
COLOUR = {"red": "red", "green": "green", "blue": "blue", "reddish": "red", "greenish": "green", "bluish": "blue"}


@pytest.fixture
def shades(tmp_path):
    """Three solid colours the fast model is sure of, three muddy shades it is not, one broken file."""
    d = tmp_path / "shades"
    d.mkdir()
    for name, rgb in {**SURE, **UNSURE}.items():
        write_colour_image(d / f"{name}.png", rgb, size=(60, 44))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    return d


def models(tmp_path):
    """A fast RGB model of 32x32 and a strong one that takes 24x24 in BGR order (so it calls
    a reddish image blue): an answer shows which model gave it, and pixels made for
    the fast model would not fit the strong one."""
    fast = tiny_card(tiny_colour_model(tmp_path / "fast.onnx"))
    strong = tiny_card(tiny_colour_model(tmp_path / "strong.onnx", size=24), name="tiny_strong",
                       inputs=[dict(name="images", dtype="float32", shape=[3, 24, 24], layout="NCHW",
                                    channels="BGR", value_range=[-1, 1])],
                       preprocess=dict(resize=28, crop=24))
    return fast, strong


def cascade_graph(images, out, fast, strong, below=0.9, **kw) -> Graph:
    p = Pipeline()
    p | Files(str(images / "*.png")) | Cascade(fast, strong, below=below, topk=2, **kw) \
        | WriteParquet(out / "answers")
    p.dead_letters | WriteParquet(out / "dead_letter", id="dead")
    return p.graph


def check_answers(rows, dead, images):
    by_name = {os.path.basename(r["id"]): r for r in rows}
    assert sorted([*by_name, *(os.path.basename(d["id"]) for d in dead)]) == sorted(os.listdir(images))
    assert [(os.path.basename(d["id"]), d["stage"]) for d in dead] == [("broken.png", "cascade/fast/decode")]
    for name, r in by_name.items():
        unsure = name.removesuffix(".png") in UNSURE
        assert r["fast_model"] == "tiny_colour:1" and r["fast_label"] == COLOUR[name.removesuffix(".png")]
        assert (r["fast_score"] < 0.9) == unsure
        if unsure:  # answered by the strong model, which reads BGR: red and blue swap
            assert r["escalation"] == "escalated" and r["model"] == "tiny_strong:1"
            assert r["label"] == {"red": "blue", "green": "green", "blue": "red"}[r["fast_label"]]
        else:
            assert r["escalation"] == "not_needed" and r["model"] == "tiny_colour:1"
            assert (r["label"], r["score"], r["topk_labels"]) == (r["fast_label"], r["fast_score"],
                                                                 r["fast_topk_labels"])
        assert not {"data", "cascade_data", "pixels", "image"} & set(r)


def test_every_input_is_answered_once_by_exactly_one_model(tmp_path, shades, any_runner):
    fast, strong = models(tmp_path)
    out = tmp_path / "out"
    stats = run_graph(cascade_graph(shades, out, fast, strong), any_runner)
    assert (stats.inputs, stats.scored, stats.failed) == (7, 6, 1)
    check_answers(read(out, "answers"), read(out, "dead_letter"), shades)


def test_the_edge_runner_and_direct_runner_give_the_same_rows(tmp_path, shades):
    fast, strong = models(tmp_path)
    for runner in ("EdgeRunner", "DirectRunner"):
        run_graph(cascade_graph(shades, tmp_path / runner, fast, strong), runner)
    drop = ("key",)
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in read(tmp_path / n, "answers")]
            for n in ("EdgeRunner", "DirectRunner"))
    assert_same_rows(a, b)


def test_below_zero_keeps_every_fast_answer_and_one_escalates_all(tmp_path, shades):
    fast, strong = models(tmp_path)
    for below, expect in ((0.0, {"not_needed"}), (1.0, {"escalated"})):
        out = tmp_path / str(below)
        run_graph(cascade_graph(shades, out, fast, strong, below=below))
        assert {r["escalation"] for r in read(out, "answers")} == expect


def test_the_strong_branch_decodes_again_at_its_own_size(tmp_path):
    fast, strong = models(tmp_path)
    g = cascade_graph(tmp_path, tmp_path / "out", fast, strong)
    stages = {s.id: [(x.op, x.params.get("crop")) for x in s.steps] for s in compile(g).stages}
    assert stages["cascade/read"] == [("read_files", None), ("rename", None), ("decode_resize", 32),
                                      ("onnx_infer", None), ("topk", None)]
    assert stages["cascade/strong_bytes"] == [("rename", None), ("decode_resize", 24), ("onnx_infer", None),
                                              ("topk", None)]
    assert stages["cascade/fast_answer"] == [("rename", None), ("drop", None)]
    assert "cascade_data" not in g.schema("cascade/drop_bytes").names
    assert "data" in g.schema("cascade/strong_bytes").names


def test_bad_cascades_are_refused_when_built_naming_the_step_and_value(tmp_path):
    fast, strong = models(tmp_path)
    other = tiny_card(tiny_colour_model(tmp_path / "cmy.onnx"), name="cmy", labels=["cyan", "magenta", "red"])
    src = Pipeline() | Files(str(tmp_path))
    with pytest.raises(KnobError, match=r"Cascade 'cascade': the two models must answer with the same labels, "
                                        r"but label 0 is 'red' for tiny_colour:1 and 'cyan' for cmy:1"):
        src | Cascade(fast, other)
    for below in (1.5, -0.1):
        with pytest.raises(KnobError, match=rf"Cascade: below must be between 0 and 1, got {below}"):
            src | Cascade(fast, strong, below=below, topk=2)
    text = cascade_graph(tmp_path, tmp_path / "o", fast, strong).to_json().replace('"below": 0.9', '"below": 2.0')
    with pytest.raises(KnobError, match="Escalate: below must be between 0 and 1, got 2"):
        Graph.from_json(text)
    detector = tiny_card(tiny_colour_model(tmp_path / "d.onnx"), name="det", task="text-detection")
    with pytest.raises(KnobError, match="Cascade 'cascade': the strong model: det:1 is a text-detection model"):
        src | Cascade(fast, detector, topk=2)
    with pytest.raises(KnobError, match="placement is per branch .* got 'middle'"):
        src | Cascade(fast, strong, topk=2, placement={"middle": {"tier": "edge"}})
    with pytest.raises(KnobError, match="step '(cascade/)?read': placement tier must be one of device, edge, "
                                        "cloud, got 'moon'"):
        src | Cascade(fast, strong, topk=2, placement={"fast": {"tier": "moon"}})


def test_calibration_picks_the_cheapest_threshold_that_agrees_enough():
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
    fast = ["a", "b", "c", "d", "x", "e", "f", "g", "h", "i"]
    strong = ["z", "z", "c", "d", "e", "e", "f", "g", "h", "i"]  # disagree at 0.1, 0.2 and 0.7
    assert outcomes(scores, fast, strong, 0.0) == (0.0, 0.7)
    assert calibrate(scores, fast, strong, 0.8).threshold == 0.2  # the lowest alone
    c = calibrate(scores, fast, strong, 0.85)  # escalating the two lowest is enough
    assert (c.threshold, c.escalated, c.agreement, c.rows) == (0.3, 0.2, 0.9, 10)
    c = calibrate(scores, fast, strong, 1.0)  # the 0.7 row must go up too: everything below 0.8
    assert (c.threshold, c.escalated, c.agreement) == (0.8, 0.5, 1.0)
    assert calibrate(scores, fast, strong, 0.5).threshold == 0.0
    assert "escalating below 0.8000, chosen on 10 calibration images (escalates 50.0%, agrees with s:1 on " \
           "100.0%)" in calibrate(scores, fast, strong, 1.0).line("s:1", 1.0)
    with pytest.raises(KnobError, match="between 0 and 1, got 1.2"):
        calibrate(scores, fast, strong, 1.2)


def test_placement_hints_are_data_outside_the_fingerprint_and_split_stages(tmp_path):
    fast, strong = models(tmp_path)
    placed = cascade_graph(tmp_path, tmp_path / "o", fast, strong,
                           placement={"fast": {"tier": "device"}, "strong": {"tier": "cloud", "device": "gpu"}})
    plain = cascade_graph(tmp_path, tmp_path / "o", fast, strong)
    assert placed.fingerprint() == plain.fingerprint() and placed != plain
    back = Graph.from_json(placed.to_json())
    strong_infer = back.step("cascade/strong/infer")
    assert back == placed and dict(strong_infer.placement) == {"tier": "cloud", "device": "gpu"}
    assert strong_infer.operator().placement == {"device": "gpu", "tier": "cloud"}
    assert '"placement"' not in plain.to_json()
    stages = {s.id: s.placement for s in compile(placed).stages}
    assert stages["cascade/read"] == {"tier": "device"}
    assert stages["cascade/strong_bytes"] == {"device": "gpu", "tier": "cloud"}
    assert stages["cascade/answers"] == {}
    # a placement the planner must respect: a chain of maps split where the hint changes
    from beamzoo import ReadFiles
    from beamzoo.transforms.preprocess import DecodeImage
    g = (Graph.source(Files(str(tmp_path))) | ReadFiles().placed(tier="edge") | DecodeImage().placed(tier="cloud")
         | WriteParquet(tmp_path / "x")).graph
    assert [[x.op for x in s.steps] for s in compile(g).stages] == [["files"], ["read_files"], ["decode_image"],
                                                                    ["parquet"]]
    bad = placed.to_json().replace('"device": "gpu"', '"device": "tpu"', 1)
    with pytest.raises(KnobError, match="placement device must be one of cpu, gpu, got 'tpu'"):
        Graph.from_json(bad)


def test_a_composite_can_stand_in_for_the_strong_branch(tmp_path, shades):
    fast, strong = models(tmp_path)
    from beamzoo.classify import ClassifyBytes
    branch = ClassifyBytes(strong, topk=2, id="remote")
    p = Pipeline()
    p | Files(str(shades / "*.png")) | Cascade(fast, branch, below=0.9, topk=2) | WriteParquet(tmp_path / "o" / "a")
    p.dead_letters | WriteParquet(tmp_path / "o" / "dead", id="dead")
    assert "cascade/remote/infer" in [s.id for s in p.graph.steps]
    run_graph(p.graph)
    rows = read(tmp_path / "o", "a")
    assert {r["model"] for r in rows if r["escalation"] == "escalated"} == {"tiny_strong:1"}
    assert len([r for r in rows if r["escalation"] == "escalated"]) == 3


def test_a_placed_cascade_exports_to_a_bundle_that_runs_on_the_edge_runner(tmp_path, shades):
    from beamzoo import bundle
    fast, strong = models(tmp_path)
    graph = cascade_graph(shades, tmp_path / "o", fast, strong,
                          placement={"fast": {"tier": "device"}, "strong": {"tier": "cloud"}})
    d = bundle.export(graph, tmp_path / "bundle")
    assert len(os.listdir(d / "models")) == 2  # both models, by sha256
    loaded = bundle.load(d, str(shades / "*.png"), str(tmp_path / "run"))
    assert dict(loaded.step("cascade/strong/infer").placement) == {"tier": "cloud"}
    stats = run_graph(loaded)
    assert (stats.inputs, stats.scored, stats.failed) == (7, 6, 1)
    check_answers(read(tmp_path / "run", "answers"), read(tmp_path / "run", "dead_letter"), shades)

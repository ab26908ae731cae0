"""beamzoo tune: the space from the knobs, the composition of injected step profiles, the choice,
the budgets and the one-line mistakes (no timing anywhere); and one real tuning run of a tiny
model whose verdicts cannot depend on the machine's speed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from beamzoo.cli import main
from beamzoo.pipeline import score_images
from beamzoo.runners.edge import EdgeRunner
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.model import INTRA_OP_THREADS
from beamzoo.transforms.preprocess import ResizeCrop
from beamzoo.tune.graphs import CLASSIFY_FLAGS, CLASSIFY_KNOBS
from beamzoo.tune.predict import Costs, Predictor, read_costs
from beamzoo.tune.profile import ModelProfile, Profile, StepCost
from beamzoo.tune.result import parse_target
from beamzoo.tune.search import budgets, choose, predict_all
from beamzoo.tune.space import Dim, Models, runner_dims, step_dims
from beamzoo.zoo import sha256_of
from conftest import COLOURS, ROOT, error_line, tiny_colour_model


# ---------------------------------------------------------------- the space

def test_the_space_is_what_the_graphs_steps_declare_and_nothing_else(tmp_path):
    graph = score_images(str(tmp_path / "*.jpg"), str(tmp_path / "out"), "efficientnet_lite0")
    dims = {d.flag: d for d in step_dims(graph, CLASSIFY_KNOBS, CLASSIFY_FLAGS, cores=4)}
    assert set(dims) == {"batch_size", "threads", "shrink"}  # topk, max_pixels, ... declare no values to try
    assert dims["batch_size"].values == OnnxInference.knobs["batch_size"].candidates(4)
    assert dims["threads"].values == INTRA_OP_THREADS.candidates(4) and dims["threads"].name == "intra_op_threads"
    assert dims["shrink"].values == ResizeCrop.knobs["shrink"].candidates(4)
    assert dims["batch_size"].steps == ("classify/infer",) and dims["shrink"].steps == ("classify/resize",)
    assert dims["shrink"].results and not dims["batch_size"].results  # a filter changes pixels, a batch does not
    (workers,) = runner_dims(4)
    assert workers.values == EdgeRunner.knobs["workers"].candidates(4) == (1, 2, 4, 8) and workers.default == 4


def test_a_knob_the_steps_do_not_declare_as_such_is_not_in_the_space(tmp_path):
    graph = score_images(str(tmp_path / "*.jpg"), str(tmp_path / "out"), "efficientnet_lite0")
    lookalike = CLASSIFY_KNOBS["batch_size"].but(tune=(1, 2))  # the same name, another declaration
    assert step_dims(graph, {"batch_size": lookalike}, {}, cores=2) == []
    assert step_dims(graph, {"topk": CLASSIFY_KNOBS["topk"]}, {}, cores=2) == []  # declares no values to try


# ---------------------------------------------------------------- composition of injected profiles

def _step(core, rows=1.0, parallel=True, branch=False, placement=None):
    return StepCost(core, core, rows, parallel, branch, placement or {})


def _model(infer, answers):
    return ModelProfile({"files": _step(0.0001, parallel=False), "classify/read": _step(0.001),
                         "classify/decode+resize": _step(0.004, branch=True),
                         "classify/infer": _step(infer, branch=True),
                         "write": _step(0.0002, parallel=False)}, answers)


FAST_SCORES = [0.1, 0.2, 0.3, 0.4, 0.45, 0.6, 0.7, 0.8, 0.9, 0.95]  # half below 0.5
STRONG = {f"i{i}": ("cat", 0.9) for i in range(10)}
FAST = {f"i{i}": ("dog" if i in (0, 1, 7) else "cat", s) for i, s in enumerate(FAST_SCORES)}  # i0, i1 escalated


def _profile(**kw):
    p = Profile({"fast": _model(0.002, FAST), "strong": _model(0.02, STRONG)}, base="fast",
                defaults={"batch_size": 4, "workers": 2},
                knobs={"batch_size": {4: {"classify/infer": _step(0.002)}, 8: {"classify/infer": _step(0.001)}}},
                glue={"cascade/answers": _step(0.0003, parallel=False)}, cores=4, inputs=10, scope="classify")
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _sum(steps):
    return sum(c.core_s * c.rows for c in steps.values())


def test_a_cascades_cost_takes_its_strong_branch_for_the_escalated_fraction_only():
    predict = Predictor(_profile(), total=1000, reference="strong")
    fast = {"model": "fast", "batch_size": 4, "workers": 2}
    cascade = {**fast, "escalate": "strong", "escalate_below": 0.5}
    single = _sum(predict.steps(fast))
    steps = predict.steps(cascade)
    assert steps["cascade/strong/infer"].rows == 0.5 and steps["cascade/fast/infer"].rows == 1.0
    assert "cascade/read" in steps and "files" in steps and "cascade/answers" in steps
    assert _sum(steps) == pytest.approx(single + 0.5 * (0.004 + 0.02) + 0.0003)
    values, _ = predict(cascade)
    assert values["cost"] == pytest.approx(_sum(steps)) and values["core_s"] == values["cost"]
    nothing = predict.steps({**cascade, "escalate_below": 0.05})  # no score is that low: nothing escalates
    assert _sum(nothing) == pytest.approx(single + 0.0003)


def test_agreement_of_a_cascade_comes_from_the_injected_answers():
    predict = Predictor(_profile(), total=1000, reference="strong")
    assert predict({"model": "fast"})[0]["agreement"] == pytest.approx(0.7)
    assert predict({"model": "strong"})[0]["agreement"] == 1.0
    # i0 and i1 are escalated and answered by the strong model; i7 (0.8) keeps the fast model's wrong answer
    assert predict({"model": "fast", "escalate": "strong", "escalate_below": 0.5})[0]["agreement"] == pytest.approx(0.9)
    assert predict({"model": "fast", "escalate": "strong", "escalate_below": 0.85})[0]["agreement"] == 1.0


def test_a_knob_value_scales_its_own_steps_as_measured_on_the_base_model():
    predict = Predictor(_profile(), total=1000)
    at4 = predict.steps({"model": "strong", "batch_size": 4})
    at8 = predict.steps({"model": "strong", "batch_size": 8})
    assert at8["classify/infer"].core_s == pytest.approx(at4["classify/infer"].core_s / 2)
    assert at8["classify/decode+resize"] == at4["classify/decode+resize"]


def test_throughput_is_bounded_by_cores_workers_and_the_one_thread_steps():
    predict = Predictor(_profile(), total=1000)
    steps = predict.steps({"model": "fast"})
    cpu = _sum(steps)
    threads = sum(c.wall_s for c in steps.values() if c.parallel)
    one = predict({"model": "fast", "workers": 1})[0]
    assert one["throughput"] == pytest.approx(min(4 / cpu, 1 / threads))
    assert one["finish"] == pytest.approx(1000 / one["throughput"])
    slow = _profile()
    slow.models["fast"].steps["write"] = _step(0.1, parallel=False)  # a sink that takes 0.1 s a row
    assert Predictor(slow, total=1000)({"model": "fast", "workers": 8})[0]["throughput"] == pytest.approx(10.0)


def test_prices_follow_the_steps_placement(tmp_path):
    prof = _profile()
    prof.models["fast"].steps["classify/infer"] = _step(0.002, branch=True, placement={"tier": "cloud"})
    costs = Costs(cpu=3.6, tiers={"cloud": 36.0})  # 0.001 and 0.01 per core-second
    values, _ = Predictor(prof, total=10, costs=costs)({"model": "fast"})
    rest = _sum(prof.models["fast"].steps) - 0.002
    assert values["cost"] == pytest.approx(rest * 0.001 + 0.002 * 0.01)
    (tmp_path / "costs.yaml").write_text("cpu: 0.04\ngpu: 0.9\ntiers: {device: 0, cloud: 0.08}\n")
    assert read_costs(str(tmp_path / "costs.yaml")) == Costs(0.04, 0.9, {"device": 0.0, "cloud": 0.08})


def test_a_knob_values_steps_are_charged_what_the_tree_spent_beyond_the_others(tmp_path):
    from beamzoo.core.metrics import StepMetrics
    from beamzoo.tune.measure import Run
    from beamzoo.tune.profile import step_costs, varied
    graph = score_images(str(tmp_path / "*.jpg"), str(tmp_path / "out"), "efficientnet_lite0")

    def run(infer_cpu, infer_wall, decode_wall, tree_cpu):
        steps = {"classify/read": StepMetrics("map", 10, 10, cpu_s=0.01, wall_s=0.01),
                 "classify/decode+resize": StepMetrics("map", 10, 10, cpu_s=0.001, wall_s=decode_wall),
                 "classify/infer": StepMetrics("map", 10, 10, cpu_s=infer_cpu, wall_s=infer_wall)}
        stages = [{"steps": list(steps), "parallel": True}]
        return Run({}, {}, steps, stages, {}, tree_cpu, 10, graph=graph)
    costs, other = step_costs(run(0.05, 0.05, 0.03, 0.1), "classify")
    # the isolated decoder's thread waits for its process: its wall is its cost
    assert costs["classify/decode+resize"].core_s == pytest.approx(0.003) and costs["classify/decode+resize"].branch
    assert not costs["classify/read"].branch  # it loads the input: a cascade reads once
    assert other == pytest.approx(0.01 - 0.001 - 0.003 - 0.005)
    base = ModelProfile(costs, {}, other)
    # threads=0: onnxruntime's own threads work, the infer thread's CPU drops, the decoder's wall grows
    mine = varied(run(0.02, 0.03, 0.06, 0.12), base, ("classify/infer",), "classify")
    assert set(mine) == {"classify/infer"}
    assert mine["classify/infer"].core_s == pytest.approx(0.012 - 0.001 - 0.003 - other)
    assert mine["classify/infer"].wall_s == pytest.approx(0.003)


# ---------------------------------------------------------------- the choice

def _points(targets):
    dims = [Dim("batch_size", "batch_size", (4, 8), 4, "step"), Dim("workers", "workers", (1, 2), 2, "runner")]
    models = [Models("fast"), Models("strong"), Models("fast", "strong", 0.5), Models("fast", "strong", 0.85)]
    return predict_all(Predictor(_profile(), total=1000, reference="strong"), models, dims, targets)


def test_the_cheapest_configuration_predicted_to_meet_every_target_is_chosen_and_verified():
    targets = [parse_target("agreement>=0.85"), parse_target("throughput>=1")]
    points = _points(targets)
    feasible = [p for p in points if p.feasible]
    assert feasible and len(feasible) < len(points)
    runs = []

    def measure(config):
        runs.append(config)
        return dict(next(p for p in points if p.config == config).predicted)
    chosen, line = choose(points, targets, measure)
    assert line is None and chosen.predicted["cost"] == min(p.predicted["cost"] for p in feasible)
    assert chosen.config["escalate"] == "strong" and chosen.config["escalate_below"] == 0.5  # cheaper than strong
    assert chosen.config["batch_size"] == 8 and runs == [chosen.config] and chosen.measured["agreement"] == 0.9


def test_a_verification_that_misses_a_target_tries_the_next_cheapest():
    targets = [parse_target("agreement>=0.85")]
    points = _points(targets)

    def measure(config):
        values = dict(next(p for p in points if p.config == config).predicted)
        if config.get("escalate_below") == 0.5:
            values["agreement"] = 0.8  # the sample said 0.9; the run says otherwise
        return values
    chosen, line = choose(points, targets, measure)
    assert line is None and chosen.measured["agreement"] >= 0.85 and chosen.config.get("escalate_below") != 0.5


def test_an_infeasible_target_gets_one_line_naming_it_and_the_best_measured():
    targets = [parse_target("agreement>=0.5"), parse_target("throughput>=100000")]
    points = _points(targets)
    best = max((p for p in points if p.predicted["agreement"] >= 0.5), key=lambda p: p.predicted["throughput"])
    chosen, line = choose(points, targets, lambda config: {**best.predicted, "throughput": 123.4})
    assert chosen is None and "\n" not in line
    assert line == ("target 'throughput>=100000' cannot be met on this machine together with 'agreement>=0.5': "
                    "the best measured is 123.4 inputs/s (model=fast, batch_size=8, workers=2)")
    assert best.config == {"model": "fast", "batch_size": 8, "workers": 2}


def test_budgets_split_a_latency_target_in_proportion_or_leave_room_without_one():
    steps = {"classify/decode+resize": _step(0.03), "classify/infer": _step(0.06), "write": _step(0.01)}
    split = budgets(steps, [parse_target("latency_p95<=0.5")])
    assert sum(split.values()) == pytest.approx(0.5)
    assert split["classify/infer"] == pytest.approx(0.3) and split["write"] == pytest.approx(0.05)
    loose = budgets(steps, [parse_target("throughput>=10")])
    assert loose == pytest.approx({k: 1.5 * c.wall_s for k, c in steps.items()})
    ocr = {"ocr/detect": _step(0.3), "ocr/recognize": _step(0.05, rows=4.0)}  # 4 regions an image
    split = budgets(ocr, [parse_target("latency_p95<=1")])
    assert sum(split[k] * c.rows for k, c in ocr.items()) == pytest.approx(1.0)
    assert split["ocr/detect"] == pytest.approx(0.6) and split["ocr/recognize"] == pytest.approx(0.1)


# ---------------------------------------------------------------- one-line mistakes

def test_a_bad_target_is_one_line(capsys):
    assert main(["tune", "--target", "speed>=3"]) == 2
    assert error_line(capsys.readouterr().err).startswith("error: --target 'speed>=3': unknown metric 'speed'")


def test_a_sample_of_nothing_is_one_line(capsys):
    assert main(["tune", "--sample", "0"]) == 2
    assert error_line(capsys.readouterr().err) == "error: argument --sample: must be >= 1, got 0"


def test_unknown_keys_of_a_costs_file_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "costs.yaml").write_text("cpu: 0.04\nram: 0.01\n")
    assert main(["tune", "--costs", str(tmp_path / "costs.yaml"), "--target", "throughput>=1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --costs {tmp_path / 'costs.yaml'}: unknown key 'ram'; the keys are cpu (")


def test_serve_needs_a_rate(capsys):
    assert main(["tune", "--serve"]) == 2
    assert "--serve and --rate R go together" in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- a real tuning run

def _variant(repo, name, size, top1):
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    model = tiny_colour_model(folder / "m.onnx", size=size)
    (folder / "labels.txt").write_text("\n".join(COLOURS) + "\n")
    card = dict(name=name, version="1", task="image-classification", file="m.onnx", sha256=sha256_of(model),
                inputs=[dict(name="images", dtype="float32", shape=[3, size, size], layout="NCHW", channels="RGB",
                             value_range=[-1, 1])],
                outputs=[dict(name="logits", dtype="float32", shape=[3])], labels="labels.txt",
                preprocess=dict(resize=size + size // 8, crop=size), tags=["colour"],
                metrics=dict(colour_top1=dict(value=top1, source="tests/test_tune.py, solid colours")))
    (folder / "card.yaml").write_text(yaml.safe_dump(card))


@pytest.mark.slow
def test_beamzoo_tune_chooses_and_writes_a_config_for_a_tiny_model(tmp_path, colour_dir):
    repo = tmp_path / "repo"
    _variant(repo, "tiny_colour", 32, 0.99)
    _variant(repo, "tiny_colour_small", 16, 0.9)
    out = tmp_path / "tuned.yaml"
    cmd = [sys.executable, "-m", "beamzoo.cli", "tune", "--input", str(colour_dir), "--zoo", str(repo),
           "--model", "tiny_colour_small:1", "--sample", "6", "--target", "throughput>=0.001",
           "--target", "agreement>=0.5", "--config", str(out)]
    got = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert "predicted" in got.stdout and "measured" in got.stdout and f"config written to {out}" in got.stdout
    text = out.read_text()
    assert text.startswith("# written by: beamzoo tune --input")
    config = yaml.safe_load(text)
    knobs = config["knobs"]
    assert config["graph"] == "classify" and config["targets"] == ["throughput>=0.001", "agreement>=0.5"]
    assert knobs["model"] in ("tiny_colour:1", "tiny_colour_small:1")
    assert knobs["batch_size"] in OnnxInference.knobs["batch_size"].candidates(os.cpu_count())
    assert knobs["threads"] in INTRA_OP_THREADS.candidates(os.cpu_count())
    assert knobs["workers"] in EdgeRunner.knobs["workers"].candidates(os.cpu_count())
    measured = config["measured"]
    assert measured["throughput"] > 0 and measured["cost"] > 0 and measured["latency_p95"] >= 0
    assert measured["agreement"] == 1.0  # solid colours: every variant and cascade answers alike
    assert config["predicted"]["agreement"] == 1.0
    assert config["budgets"] and all(v > 0 for v in config["budgets"].values())
    out.unlink()
    cmd[cmd.index("throughput>=0.001")] = "throughput>=1e9"  # no machine does that
    got = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert got.returncode == 2 and not out.exists()
    assert error_line(got.stderr).startswith("error: target 'throughput>=1e9' cannot be met on this machine: "
                                             "the best measured is ")

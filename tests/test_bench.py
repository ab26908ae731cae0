"""The benchmark cannot rot: a tiny run of bench/run.py, every contender but Flink, in the tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_a_tiny_benchmark_runs_every_contender(tmp_path):
    contenders = ["limit", "reference", "beam_stock", "beamzoo_edge", "beamzoo_edge_inproc", "beamzoo_direct"]
    done = subprocess.run([sys.executable, "bench/run.py", "--n", "6", "--limit-sample", "4", "--only", *contenders,
                           "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results-n6.json").read_text())
    for name in contenders:
        res = report["results"][name]
        assert "error" not in res, (name, res.get("log_tail"))
        assert res["images_per_s"] > 0, name
    assert report["agreement"]["all"] == {"files": 6, "agree": 1.0}  # every contender, the same top-1s
    steps = report["results"]["beamzoo_edge"]["steps"]
    assert steps["classify/infer"]["rows_in"] == 6 and "per step" in done.stdout  # where the time goes


@pytest.mark.slow
def test_a_tiny_serve_benchmark_measures_small_requests_among_big_ones(tmp_path):
    done = subprocess.run([sys.executable, "bench/serve.py", "--n", "4", "--sections", "lone,fair", "--seconds", "1",
                           "--lone", "3", "--small-rate", "4", "--big-rows", "3", "--big-clients", "1",
                           "--big-side", "400", "--workers", "1", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fair = json.loads((tmp_path / "out" / "serve-n4.json").read_text())["fairness"]
    for phase in ("small_alone", "small_under_big"):
        assert fair[phase]["requests"] > 0 and fair[phase]["errors"] == 0, fair[phase]
    assert fair["big"]["answered"] >= 1 and fair["big"]["errors"] == 0, fair["big"]
    assert "among big" in done.stdout


@pytest.mark.slow
def test_a_tiny_ocr_benchmark_reads_with_rapidocr_and_beamzoo_and_scores_both(tmp_path):
    done = subprocess.run([sys.executable, "bench/ocr.py", "--n", "3", "--repeat", "1", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = {t["contender"]: t for t in json.loads((tmp_path / "out" / "ocr-n3.json").read_text())["table"]}
    assert set(table) == {"rapidocr", "edge"} and "CER without spaces" in done.stdout
    assert all(t["images_per_s"] > 0 and t["cer_without_spaces"] >= 0 for t in table.values()), table
    assert table["edge"]["cer"] <= table["rapidocr"]["cer"]  # the same models; beamzoo puts dropped spaces back


def test_the_fidelity_bench_scores_every_image_with_reduced_decoding_on_and_off(tmp_path):
    done = subprocess.run([sys.executable, "bench/fidelity.py", "--n", "2", "--repeat", "1", "--upscale", "4",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "top-1 agreement:" in done.stdout and "UPSCALED x4" in done.stdout
    real, upscaled = json.loads((tmp_path / "fidelity.json").read_text())["sets"]
    assert (real["images"], real["reduced"], real["compared"]) == (2, 0, 2)  # two sample photos, small enough
    assert real["agreement"] == 1.0 and real["max_abs_score_diff_rest"] < 1e-5  # the same pixels either way
    assert (upscaled["images"], upscaled["reduced"], upscaled["dead_letters"]) == (2, 2, 0)
    assert upscaled["changed_in_top5"] <= upscaled["changed"] and upscaled["speedup"] > 0


@pytest.mark.slow
def test_a_tiny_serve_benchmark_measures_binary_against_json_and_grpc_against_http(tmp_path):
    done = subprocess.run([sys.executable, "bench/serve.py", "--n", "3", "--sections", "wire,grpc", "--seconds", "1",
                           "--wire-concurrency", "1,2", "--max-requests", "20", "--workers", "1",
                           "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "serve-n3.json").read_text())
    wire = result["wire"]
    assert wire["labels_agree"] == 1.0 and "binary / JSON" in done.stdout
    assert wire["bytes"]["binary"]["request"] < wire["bytes"]["json"]["request"]  # no base64
    loops = [r for form in ("json", "binary") for r in wire["loops"][form]]
    assert [r["clients"] for r in loops] == [1, 2, 1, 2] and all(r["requests"] > 0 and r["errors"] == 0 for r in loops)
    grpc = result["grpc"]
    if "not_measured" in grpc:  # until the gRPC service is there
        assert f"gRPC: not measured ({grpc['not_measured']})" in done.stdout
    else:
        loops = grpc["http"] + grpc["grpc"]
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in loops), loops


def _tiny_variant(repo, name, size, top1):
    import yaml
    from beamzoo.zoo import sha256_of
    from conftest import COLOURS, tiny_colour_model
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    model = tiny_colour_model(folder / "m.onnx", size=size)
    card = dict(name=name, version="1", task="image-classification", file="m.onnx", sha256=sha256_of(model),
                inputs=[dict(name="images", dtype="float32", shape=[3, size, size], layout="NCHW", channels="RGB",
                             value_range=[-1, 1])],
                outputs=[dict(name="logits", dtype="float32", shape=[3])], labels=list(COLOURS),
                preprocess=dict(resize=size + size // 8, crop=size),
                metrics=dict(colour_top1=dict(value=top1, source="tests/test_bench.py")))
    (folder / "card.yaml").write_text(yaml.safe_dump(card))


@pytest.mark.slow
def test_a_tiny_tuning_benchmark_compares_the_tuner_with_a_grid_the_defaults_and_a_hill_climb(tmp_path):
    repo = tmp_path / "repo"
    _tiny_variant(repo, "tiny_colour", 32, 0.99)
    _tiny_variant(repo, "tiny_colour_small", 16, 0.9)
    limits = ["shrink=area", "batch_size=4", "threads=1", "workers=1,2", "max_batch=4", "max_delay_ms=0"]
    done = subprocess.run([sys.executable, "bench/tune.py", "--n", "4", "--sample", "4", "--zoo", str(repo),
                           "--model", "tiny_colour_small:1", "--throughput", "1", "--rate", "50", "--latency", "5",
                           "--agreement", "0.5", "--cascade-deciles", "5", *[a for x in limits for a in ("--limit", x)],
                           "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert list(report["results"]) == ["throughput", "latency", "agreement"]
    assert report["grid_runs"]["batch"] and report["grid_runs"]["serve"]
    for r in report["results"].values():  # targets every configuration meets: each method's choice is verified
        rows = r["rows"]
        assert set(rows) == {"tuner", "grid", "defaults", "hill-climb"}
        assert all(row["met"] and row["verified"]["cost"] > 0 for row in rows.values()), rows
        assert 0 < rows["tuner"]["time_vs_grid"] and rows["grid"]["cost_vs_grid"] == 1.0
        assert r["tuner"]["space"] > r["grid_space"]["configurations"]  # the tuner searches a superset
    assert (tmp_path / "out" / "tune.png").stat().st_size > 0 and "cost / grid" in done.stdout

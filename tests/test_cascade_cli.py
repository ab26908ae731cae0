"""score_images.py with a cascade, a deadline and gates, as a user runs it: real zoo
models on the sample photographs; user mistakes are ``error:`` lines with exit 2."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from beamzoo.samples import make_sample_set
from conftest import ROOT, assert_same_rows, read

pytestmark = pytest.mark.integration


def score(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == code, (out.stdout[-2000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    make_sample_set(d)
    return d


def test_lite0_escalates_to_lite2_below_the_threshold(tmp_path, photos):
    score("--input", str(photos), "--output", str(tmp_path / "out"), "--runner=EdgeRunner",
          "--model", "efficientnet_lite0", "--escalate", "efficientnet_lite2", "--escalate_below", "0.5")
    rows = read(tmp_path / "out")
    assert len(rows) == len(os.listdir(photos))
    escalated = [r for r in rows if r["escalation"] == "escalated"]
    assert 0 < len(escalated) < len(rows)  # the photos have sure and unsure answers
    for r in rows:
        up = r["fast_score"] < 0.5
        assert r["model"] == ("efficientnet_lite2:1" if up else "efficientnet_lite0:1")
        assert r["fast_model"] == "efficientnet_lite0:1" and r["escalation"] == ("escalated" if up else "not_needed")
        if not up:
            assert (r["label"], r["score"]) == (r["fast_label"], r["fast_score"])
    cats = {r["label"] for r in rows if "chelsea" in r["id"]}
    assert cats <= {"tabby", "tiger cat", "Egyptian cat"}


def test_int8_escalates_to_fp32_of_the_same_model_on_direct_runner_too(tmp_path, photos):
    args = ["--input", str(photos), "--model", "efficientnet_lite0_int8", "--escalate", "efficientnet_lite0",
            "--escalate_below", "0.6"]
    score(*args, "--output", str(tmp_path / "edge"), "--runner=EdgeRunner")
    score(*args, "--output", str(tmp_path / "direct"), "--runner=DirectRunner")
    edge, direct = (read(tmp_path / n) for n in ("edge", "direct"))
    assert {r["model"] for r in edge} == {"efficientnet_lite0_int8:1", "efficientnet_lite0:1"}
    strip = [{k: v for k, v in r.items() if k != "key"} for r in edge]
    assert_same_rows(strip, [{k: v for k, v in r.items() if k != "key"} for r in direct])


def test_the_agreement_target_chooses_and_prints_the_threshold(tmp_path, photos):
    out = score("--input", str(photos), "--output", str(tmp_path / "out"), "--runner=EdgeRunner",
                "--escalate", "efficientnet_lite2", "--escalate_agreement", "0.9", "--calibration_images", "12")
    m = re.search(r"--escalate_agreement 0.9: escalating below ([0-9.]+), chosen on 12 calibration images "
                  r"\(escalates ([0-9.]+)%, agrees with efficientnet_lite2:1 on ([0-9.]+)%\)", out.stdout)
    assert m, out.stdout
    threshold, agreement = float(m[1]), float(m[3])
    assert agreement >= 90.0
    rows = read(tmp_path / "out")
    # the whole input was the sample: the run agrees with Lite2 as the calibration said
    assert sum(r["escalation"] == "escalated" for r in rows) == round(float(m[2]) * len(rows) / 100)
    up = [r["fast_score"] for r in rows if r["escalation"] == "escalated"]
    kept = [r["fast_score"] for r in rows if r["escalation"] != "escalated"]
    assert max(up, default=0) < min(kept, default=1) and max(up, default=0) <= threshold <= min(kept) + 5e-5


@pytest.mark.parametrize("args, message", [
    (["--escalate", "efficientnet_lite2", "--escalate_below", "1.5"],
     "error: argument --escalate_below: must be between 0 and 1, got 1.5"),
    (["--escalate", "efficientnet_lite2", "--escalate_agreement", "2"], "--escalate_agreement: must be between 0"),
    (["--escalate_below", "0.3"], "--escalate_below and --escalate_agreement need --escalate MODEL"),
    (["--escalate", "no_such_model"], "--escalate: "),
    (["--gate", "mean_score<0.3:stop"], "error: Gate: metric must be one of mean_confidence, fraction_below, label_distance, bias, got 'mean_score'"),
    (["--gate", "mean_confidence<0.3:explode"], "error: Gate: action must be one of warn, divert, stop, got 'explode'"),
    (["--gate", "label_distance>0.3"], "error: --gate 'label_distance>0.3': label_distance needs --gate_profile"),
    (["--gate", "mean_confidence<0.3:stop", "--runner=DirectRunner"],
     "error: step 'gate' (mean_confidence<0.3:stop) may stop the run part-way: that needs the edge runner"),
])
def test_mistakes_are_error_lines_with_exit_2(tmp_path, photos, args, message):
    out = score("--input", str(photos), "--output", str(tmp_path / "out"), *args, code=2)
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_stop_gate_exits_3_with_the_reason_and_keeps_the_output(tmp_path, photos):
    d = tmp_path / "drift"
    d.mkdir()
    for f in sorted(photos.iterdir()):
        shutil.copy(f, d / f"a_{f.name}")
    rng = np.random.default_rng(1)
    for i in range(60):
        cv2.imwrite(str(d / f"z{i:03d}.png"), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    out = score("--input", str(d), "--output", str(tmp_path / "out"), "--runner=EdgeRunner", "--workers", "1",
                "--gate", "mean_confidence<0.2:stop", "--gate_window", "12", code=3)
    assert re.search(r"stopped: gate 'gate' \(mean_confidence<0.2:stop\): mean_confidence = 0\.1\d+ over the "
                     r"last 12 rows", out.stderr), out.stderr
    m = re.search(r"inputs: (\d+)  scored: (\d+)", out.stdout)
    assert len(read(tmp_path / "out")) == int(m[2]) == int(m[1]) <= 72


def test_a_profile_saved_by_one_run_gates_the_next(tmp_path, photos):
    profile = tmp_path / "profile.json"
    out = score("--input", str(photos), "--output", str(tmp_path / "ref"), "--runner=EdgeRunner",
                "--save_profile", str(profile))
    assert f"label profile of {len(os.listdir(photos))} predictions saved to {profile}" in out.stdout
    out = score("--input", str(photos), "--output", str(tmp_path / "again"), "--runner=EdgeRunner",
                "--gate", "label_distance>0.5:divert", "--gate_profile", str(profile), "--gate_window", "6")
    assert "gate: held for 0 rows" in out.stdout  # the same photos: their labels are the profile's
    assert read(tmp_path / "again", "review") == [] and len(read(tmp_path / "again")) == len(os.listdir(photos))


def test_a_bias_gate_reads_the_groups_of_a_manifest_column(tmp_path, photos):
    import pyarrow as pa
    import pyarrow.csv as csv
    rng = np.random.default_rng(2)
    noise = []
    for i in range(12):
        noise.append(str(tmp_path / f"noise{i:02d}.png"))
        cv2.imwrite(noise[-1], rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    uris = sorted(str(f) for f in photos.iterdir())[:12] + noise
    csv.write_csv(pa.table({"uri": uris, "group": ["photo"] * 12 + ["noise"] * 12}), tmp_path / "m.csv")
    out = score("--input", str(tmp_path / "m.csv"), "--output", str(tmp_path / "out"), "--runner=EdgeRunner",
                "--workers", "1", "--gate", "bias(group, score>=0.2)<0.5:warn", "--gate_window", "24")
    # only the last row's window holds 10 rows of each group (the least a group needs): noise never
    # scores 0.2, photos often do, so the lowest rate over the highest is 0 there
    assert "gate: held for 1 rows" in out.stdout
    assert {r["group"] for r in read(tmp_path / "out")} == {"photo", "noise"}

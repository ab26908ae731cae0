"""A beamzoo card as Beam's ModelHandler, and a user's card in an ordinary Beam pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

apache_beam = pytest.importorskip("apache_beam")
from apache_beam.ml.inference.base import RunInference  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

import beamzoo  # noqa: E402
from beamzoo import zoo  # noqa: E402
from beamzoo.transforms.handler import CardModelHandler  # noqa: E402
from conftest import ROOT, tiny_colour_model  # noqa: E402
from test_zoo import write_card  # noqa: E402


@pytest.fixture
def card(tmp_path):
    (tmp_path / "c").mkdir()
    return zoo.load_card(write_card(tmp_path / "c", tiny_colour_model(tmp_path / "c" / "tiny.onnx")))


def test_run_inference_with_a_card_scores_and_dead_letters_a_misfit_alone(card):
    good = [np.full((3, 32, 32), v, np.float32) for v in (0.5, -0.25)]
    wrong = np.zeros((32, 32, 3), np.float32)  # NHWC where the card says NCHW
    with beamzoo.beam_options(["--runner=DirectRunner"]) as options, apache_beam.Pipeline(options=options) as p:
        main, other = (p | apache_beam.Create([good[0], wrong, good[1]])
                       | RunInference(CardModelHandler(card, max_batch_size=8)).with_exception_handling())
        assert_that(main | apache_beam.Map(lambda r: (r.model_id, [round(float(v), 4) for v in r.inference])),
                    equal_to([("tiny_colour:1", [5.0] * 3), ("tiny_colour:1", [-2.5] * 3)]), label="scored")
        assert_that(other.failed_preprocessing[0] | apache_beam.Map(lambda r: str(r[1][1])),
                    equal_to(["ElementMismatch(\"tiny_colour:1 input 'images' takes float32 [3, 32, 32] "
                              "(no batch axis); the element is float32 [32, 32, 3]\")"]), label="refused")


def test_the_handler_refuses_a_model_that_does_not_match_its_pin(card, tmp_path):
    with open(card.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(zoo.ModelIntegrityError, match="has sha256"):
        CardModelHandler(card).load_model()


def test_classify_beam_scores_with_a_users_card(card, colour_dir, tmp_path):
    paths = tmp_path / "paths.txt"
    paths.write_text("\n".join(str(p) for p in sorted(colour_dir.glob("*.*"))) + "\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "classify_beam.py"), "--paths", str(paths),
                          "--output", str(tmp_path / "preds"), "--model", card.card_path, "--topk", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for f in tmp_path.glob("preds-predictions-*.jsonl")
            for line in f.read_text().splitlines()]
    assert len(rows) == 6 and all(r["label"] in os.path.basename(r["path"]) for r in rows)
    assert {r["model"] for r in rows} == {"tiny_colour:1"}

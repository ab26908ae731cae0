"""beamzoo transforms inside a user's own Beam pipeline: paths, fileio matches and schema'd
rows in; schema'd rows and dead letters out; mistakes caught while the pipeline is built."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.io import fileio
from apache_beam.testing.util import assert_that, equal_to

import beamzoo
from beamzoo import SchemaMismatchError
from beamzoo import beam as bz
from conftest import ROOT, error_line, read

OPTIONS = ["--runner=DirectRunner", "--direct_num_workers=2"]


def labels_of(paths) -> list[tuple[str, str]]:
    """(path, the colour its name says): what the tiny model must answer."""
    return sorted((p, re.match(r"[a-z]+", os.path.basename(p)).group()) for p in paths)


def test_paths_in_schemad_rows_and_dead_letters_out(colour_dir, tiny_model):
    paths = sorted(glob.glob(str(colour_dir / "*.*")))
    missing = str(colour_dir / "missing.png")
    with beamzoo.beam_options(OPTIONS) as options, beam.Pipeline(options=options) as p:
        preds = p | beam.Create(paths + [missing]) | bz.Classify(tiny_model, topk=2)
        assert [n for n, _ in preds.element_type._fields] == [
            "id", "path", "label", "score", "topk_labels", "topk_scores", "model"]
        picked = preds | beam.Select("path", "label") | beam.Map(lambda r: (r.path, r.label))
        assert_that(picked, equal_to(labels_of(paths)), label="labels")
        dead = bz.dead_letters(preds) | beam.Map(lambda r: (r.source, r.stage, r.error.split(":")[0]))
        assert_that(dead, equal_to([(missing, "classify/read", "FileNotFoundError")]), label="dead")


def test_fileio_matches_and_rows_with_fields_of_their_own(colour_dir, tiny_model):
    with beamzoo.beam_options(OPTIONS) as options, beam.Pipeline(options=options) as p:
        matched = (p | fileio.MatchFiles(str(colour_dir / "*.png")) | fileio.ReadMatches()
                   | "ByMatch" >> bz.Classify(tiny_model, topk=1))
        assert_that(matched | beam.Map(lambda r: (r.path, r.label)),
                    equal_to(labels_of(glob.glob(str(colour_dir / "*.png")))), label="matches")
        rows = (p | "Rows" >> beam.Create([beam.Row(path=str(colour_dir / "red0.png"), album="holiday", n=3)])
                | "ByRow" >> bz.Classify(tiny_model, topk=1))
        assert_that(rows | beam.Map(lambda r: (r.label, r.album, r.n)), equal_to([("red", "holiday", 3)]),
                    label="rows")


def test_beamzoo_transforms_chain_with_pipes_like_beams_own(colour_dir, tiny_model):
    from beamzoo.transforms.preprocess import ResizeCrop
    paths = sorted(glob.glob(str(colour_dir / "*.*")))
    with beamzoo.beam_options(OPTIONS) as options, beam.Pipeline(options=options) as p:
        preds = (p | beam.Create(paths) | bz.ReadFiles() | bz.DecodeImage()
                 | bz.ResizeCrop(**ResizeCrop.for_input(tiny_model.input).params)
                 | bz.OnnxInference(tiny_model) | bz.TopK(tiny_model, k=1))
        assert_that(preds | beam.Map(lambda r: (r.path, r.label)), equal_to(labels_of(paths)))
        bytes_seen = p | "Again" >> beam.Create(paths[:1]) | "Read" >> bz.ReadFiles()
        assert_that(bytes_seen | beam.Map(lambda r: r.data[:4]), equal_to([open(paths[0], "rb").read(4)]),
                    label="raw bytes are a column too")


def test_a_missing_preprocessing_step_raises_while_the_pipeline_is_built(tiny_model):
    ran = []
    with pytest.raises(SchemaMismatchError, match="step 'infer' cannot take its input: missing field pixels"):
        with beamzoo.beam_options(OPTIONS) as options, beam.Pipeline(options=options) as p:
            p | beam.Create(["x.jpg"]) | bz.ReadFiles() | bz.OnnxInference(tiny_model)
            ran.append("built")  # never reached: the mistake is caught at the transform
    assert ran == []


def test_beam_options_refuse_an_edge_runner_and_a_misspelt_one():
    from beamzoo.runners.options import OptionError
    for argv, msg in ((["--runner=EdgeRunner"], "runs beamzoo graphs without Beam"),
                      (["--runner=DirektRunner"], "unknown runner 'DirektRunner': beamzoo runs EdgeRunner")):
        with pytest.raises(OptionError, match=msg):
            with beamzoo.beam_options(argv):
                pass
    with beamzoo.beam_options(["--runner=DirectRunner"]) as options:
        assert options.get_all_options()["runner"].endswith("FnApiRunner")  # no Prism download


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    from badfiles import make_all
    from beamzoo.samples import make_sample_set
    d = tmp_path_factory.mktemp("listed")
    make_sample_set(d / "images" / "photos")
    make_all(d / "images" / "odd")
    paths = sorted(glob.glob(str(d / "images" / "*" / "*")))
    (d / "paths.txt").write_text("\n".join(paths) + "\n\n")
    return d, paths


def classify(listed, out, *extra):
    d, _ = listed
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "classify_beam.py"), "--paths", str(d / "paths.txt"),
           "--output", str(out / "preds"), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for f in glob.glob(str(out / "preds-predictions-*.jsonl")) for line in open(f)]
    dead = [json.loads(line) for f in glob.glob(str(out / "preds-dead_letters-*.jsonl")) for line in open(f)]
    return sorted(rows, key=lambda r: r["path"]), sorted(dead, key=lambda r: r["path"])


@pytest.fixture(scope="module")
def scored(listed, tmp_path_factory):
    d, _ = listed
    out = tmp_path_factory.mktemp("scored")
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress",
           "--input", str(d / "images" / "**" / "*.*"), "--output", str(out), "--runner=EdgeRunner"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=600)
    return read(out), read(out, "dead_letter")


def assert_like_score_images(rows, dead, scored):
    preds, scored_dead = scored
    assert [r["path"] for r in rows] == [r["path"] for r in preds]
    for a, b in zip(rows, preds):
        assert set(a) == {"path", "label", "score", "topk_labels", "topk_scores", "model"}
        assert (a["label"], a["topk_labels"], a["model"]) == (b["label"], b["topk_labels"], b["model"])
        assert abs(a["score"] - b["score"]) <= 1e-5
    assert [(x["path"], x["stage"], x["error"]) for x in dead] == [
        (x["source"], x["stage"], x["error"]) for x in sorted(scored_dead, key=lambda r: r["source"])]


def write_text_keeps(predictions: str, dead_letters: str, shards: int) -> list[str]:
    """The dead-letter files, already written, that a WriteToText of predictions leaves."""
    dead = [f"{dead_letters}-{i:05d}-of-{shards:05d}.jsonl" for i in range(shards)]
    for f in dead:
        open(f, "w").write("{}\n")
    with beamzoo.beam_options(OPTIONS) as options, beam.Pipeline(options=options) as p:
        (p | beam.Create(["{}"] * 4)
         | beam.io.WriteToText(predictions, file_name_suffix=".jsonl", num_shards=shards))
    assert len(glob.glob(f"{predictions}-*.jsonl")) == shards
    return [f for f in dead if os.path.exists(f)]


def test_classify_beams_predictions_never_delete_its_dead_letters(tmp_path):
    """A WriteToText deletes the files matching its PREFIX-*-of-N before it renames its
    own: with PREFIX "preds", the dead letters "preds-dead_letter-..." went too whenever
    they were written first (now and then on FlinkRunner)."""
    spec = importlib.util.spec_from_file_location("classify_beam", os.path.join(ROOT, "pipelines", "classify_beam.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for shards in (1, 2):
        out = tmp_path / str(shards)
        out.mkdir()
        predictions, dead_letters = module.outputs(str(out / "preds"))
        assert len(write_text_keeps(predictions, dead_letters, shards)) == shards
        old = str(out / "old")
        assert write_text_keeps(old, f"{old}-dead_letter", shards) == []  # how they were lost


@pytest.mark.parametrize("args, line", [
    (["--bogus_flag=1"], "error: unknown option --bogus_flag=1: neither classify_beam.py nor Beam knows it"),
    (["stray"], "error: unexpected argument 'stray': classify_beam.py takes no arguments"),
    (["--runner=DirektRunner"], "error: --runner: unknown runner 'DirektRunner'"),
])
def test_classify_beam_refuses_what_neither_it_nor_beam_takes(listed, tmp_path, args, line):
    d, _ = listed
    done = subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "classify_beam.py"), "--paths",
                           str(d / "paths.txt"), "--output", str(tmp_path / "preds"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and line in error_line(done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not glob.glob(str(tmp_path / "preds*"))


@pytest.mark.integration
def test_classify_beam_on_direct_runner_gives_score_images_rows(listed, scored, tmp_path):
    rows, dead = classify(listed, tmp_path, "--runner=DirectRunner")
    assert (len(rows), len(dead)) == (19, 5) and len(listed[1]) == 24
    assert_like_score_images(rows, dead, scored)


@pytest.mark.integration
@pytest.mark.flink
@pytest.mark.slow
def test_classify_beam_on_flink_gives_score_images_rows(listed, scored, tmp_path):
    rows, dead = classify(listed, tmp_path, "--runner=FlinkRunner")
    assert_like_score_images(rows, dead, scored)


def test_a_model_is_loaded_once_per_process_and_shared_by_its_threads(colour_dir, tiny_model, monkeypatch):
    from beamzoo.core import resources
    from beamzoo.transforms import inference
    resources.clear()
    made = []
    real = inference._session
    monkeypatch.setattr(inference, "_session", lambda *a: made.append(1) or real(*a))
    paths = sorted(glob.glob(str(colour_dir / "**" / "*.*"), recursive=True)) * 8
    with beamzoo.beam_options(["--runner=DirectRunner", "--direct_num_workers=2"]) as options, \
            beam.Pipeline(options=options) as p:
        preds = p | beam.Create(paths) | beam.Reshuffle() | bz.Classify(tiny_model, topk=1)
        assert_that(preds | beam.combiners.Count.Globally(), equal_to([72]))
    assert made == [1]


def test_a_union_of_one_pcollection_is_that_pcollection():
    """No single-input Flatten reaches a runner: it would be a step that does nothing. (It
    was once blamed for classify_beam.py's lost dead letters on Flink; the cause was the
    output names, see test_classify_beams_predictions_never_delete_its_dead_letters.)"""
    from beamzoo.runners.beam import flatten
    p = beam.Pipeline()
    one, two = p | "One" >> beam.Create([1]), p | "Two" >> beam.Create([2])
    assert flatten([one], "Union1") is one
    both = flatten([one, two], "Union2")
    assert both is not one and isinstance(both.producer.transform, beam.Flatten)

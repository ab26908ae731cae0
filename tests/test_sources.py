"""Sources and sinks a user expects: files (glob, directory, fsspec URLs), a manifest table
whose other columns pass through, in-memory rows; Parquet folders and JSON lines."""
from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from beamzoo import Classify, Files, Manifest, Pipeline, Rows, WriteJsonl, WriteParquet
from beamzoo.transforms.sources import Files as FilesClass
from conftest import read, run_graph


def classify_to(source, out, card):
    p = Pipeline()
    p | source | Classify(card, topk=1) | WriteParquet(out / "predictions")
    p.dead_letters | WriteParquet(out / "dead_letter", id="dead")
    return p.graph


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_manifest_passes_its_other_columns_through(tmp_path, colour_dir, tiny_model, runner, fmt):
    uris = sorted(glob.glob(str(colour_dir / "*.png"))) + [str(colour_dir / "gone.png")]
    table = pa.table({"uri": uris, "album": [f"a{i}" for i in range(len(uris))],
                      "rating": list(range(len(uris)))})
    path = tmp_path / f"manifest.{fmt}"
    (pq.write_table if fmt == "parquet" else pacsv.write_csv)(table, str(path))
    stats = run_graph(classify_to(Manifest(str(path)), tmp_path / "out", tiny_model), runner)
    assert (stats.inputs, stats.scored, stats.failed) == (4, 3, 1)
    rows = read(tmp_path / "out")
    assert [(r["id"], r["album"], r["rating"]) for r in rows] == [("row:0", "a0", 0), ("row:1", "a1", 1),
                                                                  ("row:2", "a2", 2)]
    assert [os.path.basename(r["path"])[:3] for r in rows] == ["blu", "gre", "red"]
    assert [r["label"] for r in rows] == ["blue", "green", "red"]
    [dead] = read(tmp_path / "out", "dead_letter")
    assert (dead["id"], dead["source"], dead["stage"]) == ("row:3", uris[3], "classify/read")


def test_a_manifest_without_its_uri_column_is_a_clear_error(tmp_path, tiny_model):
    pq.write_table(pa.table({"file": ["a.png"]}), str(tmp_path / "m.parquet"))
    with pytest.raises(Exception, match="has no column 'uri' \\(it has file\\); pass uri_column=..."):
        classify_to(Manifest(str(tmp_path / "m.parquet")), tmp_path / "out", tiny_model)


def test_in_memory_rows_and_a_json_lines_sink(tmp_path, colour_dir, tiny_model, runner):
    rows = [{"id": "first", "path": str(colour_dir / "red0.png"), "note": "x"},
            {"path": str(colour_dir / "blue2.png"), "note": "y"}]
    p = Pipeline()
    p | Rows(rows) | Classify(tiny_model, topk=1) | WriteJsonl(tmp_path / "out" / "answers")
    p.dead_letters | WriteParquet(tmp_path / "out" / "dead_letter")
    stats = run_graph(p.graph, runner)
    assert (stats.inputs, stats.scored) == (2, 2)
    lines = [json.loads(line) for f in glob.glob(str(tmp_path / "out" / "answers-*.jsonl")) for line in open(f)]
    got = sorted((r["id"], r["note"], r["label"]) for r in lines)
    assert got == [("first", "x", "red"), ("row:1", "y", "blue")]
    assert "data" not in lines[0] and "pixels" not in lines[0]


def test_files_from_an_fsspec_url(tmp_path, colour_dir, tiny_model):
    import fsspec
    fs = fsspec.filesystem("memory")
    for f in sorted(glob.glob(str(colour_dir / "*.png"))):
        fs.pipe(f"/photos/{os.path.basename(f)}", open(f, "rb").read())
    stats = run_graph(classify_to(Files("memory://photos/*.png"), tmp_path / "out", tiny_model))
    assert (stats.inputs, stats.scored) == (3, 3)
    rows = read(tmp_path / "out")
    assert [(r["path"], r["label"]) for r in rows] == [
        ("memory:///photos/blue2.png", "blue"), ("memory:///photos/green4.png", "green"),
        ("memory:///photos/red0.png", "red")]


def test_the_file_list_is_read_once_per_run(tmp_path, colour_dir, tiny_model, runner, monkeypatch):
    calls = []
    original = FilesClass.refs
    monkeypatch.setattr(FilesClass, "refs", lambda self: calls.append(1) or original(self))
    stats = run_graph(classify_to(Files(str(colour_dir / "**" / "*")), tmp_path / "out", tiny_model), runner)
    assert calls == [1] and stats.inputs == 9


def test_a_directory_means_its_images(tmp_path, colour_dir, tiny_model):
    (colour_dir / "notes.txt").write_text("not an image")
    stats = run_graph(classify_to(Files(str(colour_dir)), tmp_path / "out", tiny_model))
    assert (stats.inputs, stats.scored, stats.failed) == (9, 9, 0)

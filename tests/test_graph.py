"""The logical graph: frozen JSON steps, checked edges, fingerprints, and a DAG with a
branch, a merge and a one-to-many step that accounts for every record on every runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from beamzoo import (Cascade, Collect, DecodeImage, Drop, Files, Graph, GraphError, Merge, OnnxInference,
                     Pipeline, ReadFiles, ResizeCrop, Route, SchemaMismatchError, Tiles, TopK, WriteParquet)
from beamzoo.core import KnobError, NO_DEAD_LETTERS, Operator, Result, compile, dead_letters, register
from beamzoo.pipeline import score_images
from conftest import ROOT, read, run_graph, tiny_card, tiny_colour_model, write_colour_image

GOLDEN = Path(__file__).parent / "golden"


def golden_score_graph() -> Graph:
    return score_images("/data/photos/*.jpg", "/data/out", "efficientnet_lite0", topk=3)


def golden_cascade_graph() -> Graph:
    p = Pipeline()
    answers = p | Files("/data/photos") | Cascade("efficientnet_lite0", "efficientnet_lite2", below=0.4, topk=2,
                                                  placement={"fast": {"tier": "device"},
                                                             "strong": {"tier": "cloud", "device": "gpu"}})
    answers | WriteParquet("/data/out/answers")
    p.dead_letters | WriteParquet("/data/out/dead_letter", id="dead")
    return p.graph


@pytest.mark.parametrize("name, make", [("score_graph", golden_score_graph),
                                        ("cascade_graph", golden_cascade_graph)])
def test_graph_json_round_trips_exactly_and_matches_its_golden_file(name, make):
    graph = make()
    text = graph.to_json()
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("BEAMZOO_WRITE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"the graph's JSON changed; if that is meant, rewrite {golden}"
    back = Graph.from_json(text)
    assert back == graph and back.to_json() == text and back.fingerprint() == graph.fingerprint()


def test_fingerprint_is_the_same_in_another_process():
    code = ("import sys; sys.path.insert(0, 'tests'); from test_graph import golden_cascade_graph as g; "
            "print(g().fingerprint())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True).stdout.strip()
    assert other == golden_cascade_graph().fingerprint() and len(other) == 64


def test_only_knobs_that_change_results_enter_the_fingerprint():
    base = score_images("/x/*.jpg", "/out", "efficientnet_lite0").fingerprint()
    assert score_images("/x/*.jpg", "/out", "efficientnet_lite0", batch_size=32,
                        intra_op_threads=0).fingerprint() == base
    assert score_images("/x/*.jpg", "/out", "efficientnet_lite0", shrink="linear").fingerprint() != base
    assert score_images("/x/*.jpg", "/out", "efficientnet_lite0", topk=3).fingerprint() != base
    assert score_images("/x/*.jpg", "/out", "efficientnet_lite0", topk=5).fingerprint() == base  # the default k
    knobs = OnnxInference.knobs
    assert not knobs["batch_size"].results and knobs["model"].results
    assert knobs["batch_size"].low == 1 and knobs["batch_size"].default == 4


def test_a_column_produced_twice_names_both_steps(tiny_model):
    logits = Graph.source(Files("/x")) | ReadFiles() | DecodeImage() | ResizeCrop.for_input(tiny_model.input) \
        | OnnxInference(tiny_model, keep_input=True)
    first = logits | TopK(tiny_model, k=2, input_field="logits")
    second = first | OnnxInference(tiny_model, id="infer2", output_field="logits2")
    with pytest.raises(GraphError, match="column 'label' is produced twice: by step 'topk' and by step 'topk2'"):
        second | TopK(tiny_model, k=2, input_field="logits2", id="topk2")
    both = second | TopK(tiny_model, k=2, input_field="logits2", id="topk2", prefix="second_")
    assert {"label", "second_label"} <= set(both.schema.names)


def test_duplicate_ids_cycles_and_dangling_refs_are_refused():
    steps = json.loads(golden_score_graph().to_json())
    dup = json.loads(json.dumps(steps))
    dup["steps"].append(dict(dup["steps"][1]))
    with pytest.raises(GraphError, match="step id 'classify/read' is used twice"):
        Graph.from_json(json.dumps(dup))
    cyc = json.loads(json.dumps(steps))
    by_id = {s["id"]: s for s in cyc["steps"]}
    by_id["classify/read"]["inputs"] = ["classify/topk"]
    with pytest.raises(GraphError, match="cycle through steps .*decode.*read.*topk"):
        Graph.from_json(json.dumps(cyc))
    by_id["classify/read"]["inputs"] = ["nowhere"]
    with pytest.raises(GraphError, match="step 'classify/read' reads 'nowhere', but there is no step 'nowhere'"):
        Graph.from_json(json.dumps(cyc))


def test_a_missing_step_and_an_unknown_option_are_clear_at_once(tiny_model):
    with pytest.raises(SchemaMismatchError, match="step 'infer' cannot take its input: missing field pixels"):
        Graph.source(Files("/x")) | ReadFiles() | OnnxInference(tiny_model)
    with pytest.raises(KnobError, match="ReadFiles has no option 'max_size'; its options: max_bytes, batch_bytes"):
        ReadFiles(max_size=3)
    with pytest.raises(KnobError, match="ReadFiles has no option 'max_size'; its options: max_bytes, batch_bytes"):
        ReadFiles.from_params({"max_size": 3})  # as a graph read from JSON gives it
    with pytest.raises(KnobError, match="OnnxInference: batch_size must be between 1 and 65536, got 0"):
        OnnxInference(tiny_model, batch_size=0)


def test_the_compiler_fuses_decode_and_resize_and_row_parallel_maps(tiny_model):
    graph = score_images("/x/*.jpg", "/out", tiny_model, topk=2)
    stages = compile(graph).stages
    assert [[s.op for s in st.steps] for st in stages] == [
        ["files"], ["read_files", "decode_resize", "onnx_infer", "topk"], ["parquet"], ["parquet"]]
    fused = stages[1].steps[1]
    assert stages[1].parallel and fused.params["report_as"] == ["classify/decode", "classify/resize"]
    assert fused.id == "classify/decode+resize"


@register
class FailTile(Operator):
    """Dead-letters every child whose tile number is ``tile``: children that die."""

    name = "test_fail_tile"
    default_id = "fail_tile"
    requires = pa.schema([pa.field("tile", pa.int32())])

    def process(self, batch):
        tiles = batch.column("tile").to_pylist()
        bad = [i for i, t in enumerate(tiles) if t == 3]
        good = [i for i, t in enumerate(tiles) if t != 3]
        return Result(batch.take(pa.array(good, pa.int64())),
                      dead_letters(batch, bad, self.id, ["ValueError: tile 3 is refused"] * len(bad))
                      if bad else NO_DEAD_LETTERS)


@pytest.fixture
def tiled(tmp_path):
    """Four-colour images (each quarter a colour), a pale one, a 1x9 one too thin to tile, a broken one."""
    import cv2
    import numpy as np
    d = tmp_path / "tiled"
    d.mkdir()
    for i in range(5):  # tiles: 0 red, 1 green (odd images: a pale red the model is unsure of), 2 blue
        img = np.zeros((40, 48, 3), np.uint8)
        img[:20, :24], img[20:, :24], img[20:, 24:] = (20, 20, 230), (230, 20, 20), (20, 230, 20)  # BGR
        img[:20, 24:] = (100, 100, 150) if i % 2 else (20, 230, 20)
        cv2.imwrite(str(d / f"quad{i}.png"), img)
    write_colour_image(d / "thin.png", (200, 0, 0), size=(9, 1))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    return d


def tile_graph(images, out, card) -> Graph:
    p = Pipeline()
    decoded = p | Files(str(images / "*.png")) | ReadFiles() | DecodeImage()
    parts = decoded | Tiles(rows=2, cols=2)
    kids = (parts.out | FailTile() | ResizeCrop.for_input(card.input) | OnnxInference(card)
            | TopK(card, k=1))
    branch = kids | Route(sure="score >= 0.99", otherwise="unsure")
    unsure = branch.unsure | Drop(["topk_labels"], id="drop_topk")
    merged = (branch.sure, unsure) | Merge()
    per_image = (merged, parts.parents) | Collect(["label", "tile"])
    per_image | WriteParquet(out / "images")
    merged | WriteParquet(out / "tiles", id="write_tiles")
    p.dead_letters | WriteParquet(out / "dead_letter", id="write_dead")
    return p.graph


def test_a_dag_with_a_branch_a_merge_and_children_accounts_for_every_record(tmp_path, tiled, any_runner):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    out = tmp_path / "out"
    stats = run_graph(tile_graph(tiled, out, card), any_runner)
    images, tiles, dead = read(out, "images"), read(out, "tiles"), read(out, "dead_letter")
    inputs = sorted(str(p) for p in tiled.iterdir())
    # parents: inputs = collected + dead letters of parents
    parent_dead = [d for d in dead if d["parent_id"] is None]
    assert sorted([r["id"] for r in images] + [d["id"] for d in parent_dead]) == inputs
    assert {os.path.basename(d["source"]): d["stage"] for d in parent_dead} == {
        "broken.png": "decode", "thin.png": "tiles"}  # steps outside any composite: their own ids
    assert stats.inputs == 7
    # children: children = collected + dead-lettered children, per parent
    child_dead = Counter(d["parent_id"] for d in dead if d["parent_id"] is not None)
    for row in images:
        assert row["children"] == 4 == len(row["label"]) + child_dead[row["id"]]
        pale = row["id"].endswith(("quad1.png", "quad3.png"))
        assert row["tile"] == [0, 1, 2] and row["label"] == ["red", "red" if pale else "green", "blue"]
    assert all(d["stage"] == "fail_tile" and d["id"].endswith("#3") for d in dead if d["parent_id"])
    # the route sent each child one way and the merge kept both: null where a branch dropped a column
    assert len(tiles) == 15 and Counter(t["topk_labels"] is None for t in tiles) == {False: 13, True: 2}
    assert all(t["parent_id"] in {r["id"] for r in images} for t in tiles)


def test_the_dag_gives_the_same_rows_on_both_local_runners(tmp_path, tiled):
    card = tiny_card(tiny_colour_model(tmp_path / "tiny.onnx"))
    for runner in ("EdgeRunner", "DirectRunner"):
        run_graph(tile_graph(tiled, tmp_path / runner, card), runner)
    for sub in ("images", "tiles", "dead_letter"):
        a, b = read(tmp_path / "EdgeRunner", sub), read(tmp_path / "DirectRunner", sub)
        assert [r["id"] for r in a] == [r["id"] for r in b]
        assert [r.get("label") for r in a] == [r.get("label") for r in b]

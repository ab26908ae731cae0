"""beamzoo's Beam transforms declare their element types: a PCollection of anything else is
refused while the pipeline is built, and what they give downstream transforms is typed."""
from __future__ import annotations

import glob
import os
import re
import typing

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import TypeOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.typehints.decorators import TypeCheckError
from apache_beam.typehints.row_type import RowTypeConstraint

import beamzoo
from beamzoo import beam as bz
from beamzoo.classify import Classify as ClassifyGraph
from beamzoo.transforms.preprocess import ResizeCrop

OPTIONS = ["--runner=DirectRunner"]  # beam_options makes it the in-process runner: no Prism download

# Every PTransform of beamzoo.beam, built for the tiny model.
TRANSFORMS = {
    "Classify": lambda card: bz.Classify(card, topk=1),
    "ReadFiles": lambda card: bz.ReadFiles(),
    "DecodeImage": lambda card: bz.DecodeImage(),
    "ResizeCrop": lambda card: bz.ResizeCrop(**ResizeCrop.for_input(card.input).params),
    "DecodeResize": lambda card: bz.DecodeResize(**ResizeCrop.for_input(card.input).params),
    "OnnxInference": lambda card: bz.OnnxInference(card),
    "TopK": lambda card: bz.TopK(card, k=1),
    "Drop": lambda card: bz.Drop(["data"]),
    "Apply": lambda card: bz.Apply(ClassifyGraph(card, topk=1)),
}


class Photo(typing.NamedTuple):
    path: str
    album: str


def test_every_beamzoo_ptransform_is_covered_here():
    public = {n for n in bz.__all__ if isinstance(getattr(bz, n), type) and issubclass(getattr(bz, n), beam.PTransform)}
    assert public == set(TRANSFORMS)


def test_beam_options_keep_beams_pipeline_type_check_on_and_the_runtime_one_off():
    with beamzoo.beam_options(OPTIONS) as options:
        types = options.view_as(TypeOptions)
        assert (types.pipeline_type_check, types.runtime_type_check) == (True, False)


def labels(p: beam.Pipeline) -> list[str]:
    """The full label of every transform built in ``p``."""
    found, todo = [], list(p.transforms_stack[0].parts)
    while todo:
        node = todo.pop()
        found.append(node.full_label)
        todo.extend(node.parts)
    return found


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_ints_are_refused_when_the_transform_is_applied(name, tiny_model):
    built = []
    with beamzoo.beam_options(OPTIONS) as options:
        p = beam.Pipeline(options=options)
        ints = p | "Numbers" >> beam.Create([1, 2, 3])
        with pytest.raises(TypeCheckError) as caught:
            ints | TRANSFORMS[name](tiny_model)
            built.append(name)
    assert built == [] and not [label for label in labels(p) if label.startswith(name + "/")]  # no expand
    msg = str(caught.value)
    assert f"beamzoo.beam.{name}" in msg and "takes path strings, fileio matches" in msg, msg
    assert "expected Union[" in msg and "got int (from 'Numbers/" in msg, msg


def test_a_users_label_and_rows_without_a_path_are_named(tiny_model):
    p = beam.Pipeline()
    with pytest.raises(TypeCheckError, match=r"at Score: beamzoo\.beam\.Classify takes .*; "
                                             r"expected rows that have a 'path' field, got Row\(name=str\)"):
        p | beam.Create([beam.Row(name="a")]) | "Score" >> bz.Classify(tiny_model)
    with pytest.raises(TypeCheckError, match=r"beamzoo\.beam\.ReadFiles takes a PCollection of path strings.*"
                                             r"not PBegin"):
        p | bz.ReadFiles()


def test_the_declared_types_are_beams_own_hints(tiny_model):
    hints = bz.Classify(tiny_model).get_type_hints()
    assert hints.input_types == ((bz.INPUT_TYPE,), {}) and hints.simple_output_type("") is beam.Row
    # a user's own declaration wins, as with any Beam transform
    p = beam.Pipeline()
    with pytest.raises(TypeCheckError, match=r"beamzoo\.beam\.ReadFiles expected bytes, got str"):
        p | beam.Create(["a.png"]) | bz.ReadFiles().with_input_types(bytes)


def test_correct_inputs_run_and_downstream_typed_transforms_accept_the_rows(colour_dir, tiny_model):
    paths = sorted(glob.glob(str(colour_dir / "*.png")))
    with beamzoo.beam_options(OPTIONS) as options, beam.Pipeline(options=options) as p:
        preds = p | beam.Create(paths) | bz.Classify(tiny_model, topk=1)
        assert isinstance(preds.element_type, RowTypeConstraint)
        assert dict(preds.element_type._fields)["score"] == typing.Optional[float]
        scores = (preds
                  | "Typed" >> beam.Map(lambda r: (r.path, r.label, r.score)).with_input_types(beam.Row)
                  .with_output_types(typing.Tuple[str, str, float])
                  | beam.Map(lambda t: (t[0], t[1], 0.0 <= t[2] <= 1.0)))
        assert_that(scores, equal_to([(path, re.match(r"[a-z]+", os.path.basename(path)).group(), True)
                                      for path in paths]), label="typed")
        # NamedTuple rows are schema'd rows: their other fields pass through, typed
        albums = p | "Photos" >> beam.Create([Photo(paths[0], "holiday")]).with_output_types(Photo)
        got = albums | "ByPhoto" >> bz.Classify(tiny_model, topk=1)
        assert dict(got.element_type._fields)["album"] == typing.Optional[str]
        assert_that(got | "Album" >> beam.Map(lambda r: (r.album, r.label)).with_input_types(beam.Row),
                    equal_to([("holiday", "blue")]), label="photos")  # paths[0]: blue2.png
    wrong = beam.Pipeline() | beam.Create(paths) | bz.Classify(tiny_model, topk=1)
    with pytest.raises(TypeCheckError, match=r"requires PCollections of type '<class 'int'>' but was applied to "
                                             r"a PCollection of type 'Row\(id=<class 'str'>, path=<class 'str'>"):
        wrong | beam.Map(lambda n: n + 1).with_input_types(int)

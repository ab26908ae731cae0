"""Classifying images: the composites that read, decode, resize, infer and answer.

``Classify`` takes paths (it reads the files); ``ClassifyBytes`` takes file bytes
(``data``), for a cascade's branches. Both build the steps their card asks for:
decode (big JPEGs at reduced size where the resize allows), resize and crop to
the model's input contract, infer, top-k. Their knobs are the steps' own
declarations, passed on (``beamzoo.core.knobs.pick``): a default is written
once, at the step.
"""
from __future__ import annotations

from beamzoo.core.graph import Composite, Stream
from beamzoo.core.knobs import Knob, KnobError, pick
from beamzoo.transforms.deadline import DeadlineCheck
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.refresh import ANSWERED_BY
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.model import MODEL
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeImage, DecodeResize, ResizeCrop
from beamzoo.zoo import ModelCard, card_of, classifier_problem

DEFAULT_MODEL = "efficientnet_lite0"

# What one classifier's steps take, whoever passes them on (Classify, ClassifyBytes, a cascade).
STEP_KNOBS = {**pick(TopK, topk="k"), **pick(OnnxInference, "batch_size", "intra_op_threads"),
              **pick(DecodeImage, "max_pixels", "isolate", "time_limit", "memory_limit"),
              **pick(ResizeCrop, "shrink"), **pick(DecodeResize, "reduced_decode"), **pick(TopK, "prefix")}


def classifier(model, what: str = "Classify") -> ModelCard:
    """The card of ``model``, refused unless it classifies images."""
    card = card_of(model)
    problem = classifier_problem(card)
    if problem:
        raise KnobError(f"{what}: {card.ref} {problem}")
    return card


def classifier_steps(card: ModelCard, p: dict, placement: dict | None = None, deadline: bool = False) -> list:
    """The steps from file bytes to an answer, with the knobs ``p`` (``STEP_KNOBS``, and
    ``model_refresh`` if it has it); with ``deadline``, rows whose deadline passed are dead
    letters before the model runs."""
    resize = ResizeCrop.for_input(card.input, resize=card.resize, shrink=p["shrink"])
    steps = [DecodeImage(max_pixels=p["max_pixels"], channels=card.input.channels,
                         min_side=resize.resize if p["reduced_decode"] else None, isolate=p["isolate"],
                         time_limit=p["time_limit"], memory_limit=p["memory_limit"]),
             resize]
    if deadline:
        steps.append(DeadlineCheck(before="infer"))
    refresh = p.get("model_refresh")
    steps += [OnnxInference(card, batch_size=p["batch_size"], intra_op_threads=p["intra_op_threads"],
                            model_refresh=refresh),
              TopK(card, k=p["topk"], prefix=p["prefix"], model_field=None if refresh is None else ANSWERED_BY)]
    for s in steps:
        s.placed(**(placement or {}))
    return steps


class Classify(Composite):
    """paths -> predictions for an image classifier: read, decode (at reduced size where
    the resize allows), resize and crop as the card says, infer, top-k. With
    ``model_refresh`` a newer version of the model answers once it appears in the zoo
    (``OnnxInference``); each row's ``model`` says which version answered it."""

    default_id = "classify"
    knobs = {"model": MODEL.but(default=DEFAULT_MODEL, required=False), **pick(ReadFiles, "max_bytes"),
             **STEP_KNOBS, **pick(OnnxInference, "model_refresh")}
    positional = ("model",)

    def configure(self):
        self.card = classifier(self.params["model"])
        TopK(self.card, k=self.params["topk"])  # a k the model's labels allow, refused now

    def expand(self, stream: Stream) -> Stream:
        p = self.params
        stream = stream | ReadFiles(max_bytes=p["max_bytes"], time_limit=p["time_limit"])
        for step in classifier_steps(self.card, p, deadline="deadline_at" in stream.schema.names):
            stream = stream | step
        return stream


class ClassifyBytes(Composite):
    """file bytes (``data``) -> an answer: decode and resize as the card says, infer, top-k.
    Rows with a ``deadline_at`` that passed before the model runs are dead letters."""

    default_id = "classify"
    knobs = {"model": MODEL, **STEP_KNOBS,
             "placement": Knob(None, dict, results=False, doc="placement hints of its steps ({tier, device})"),
             "check_deadline": Knob(True, bool, doc="rows with a deadline_at that passed before the model runs "
                                                    "are dead letters (a cascade's strong branch: they have an "
                                                    "answer already)")}
    positional = ("model",)

    def configure(self):
        self.card = classifier(self.params["model"], type(self).__name__)
        TopK(self.card, k=self.params["topk"])

    def expand(self, stream: Stream) -> Stream:
        deadline = self.params["check_deadline"] and "deadline_at" in stream.schema.names
        for step in classifier_steps(self.card, self.params, self.params["placement"], deadline):
            stream = stream | step
        return stream


# The knobs of the classifier's steps that score_images.py (and beamzoo tune) take as flags
COMMAND_KNOBS = {k: v for k, v in Classify.knobs.items() if k not in ("model", "prefix")}

__all__ = ["COMMAND_KNOBS", "Classify", "ClassifyBytes", "DEFAULT_MODEL", "STEP_KNOBS", "classifier", "classifier_steps"]

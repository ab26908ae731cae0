"""A cascade of two classifiers: a fast model answers every row, a strong one the
rows the fast one is unsure of.

    answers = p | bz.Files("photos/*.jpg") | bz.Cascade("efficientnet_lite0", "efficientnet_lite2", below=0.5)

Each model gets its own preprocessing from its card: the file's bytes ride
along the fast branch (the same buffer, not a copy) and only escalated rows
are decoded again, at the strong model's size; kept rows drop them. Every
input comes out once (or as a dead letter), answered by exactly one model:

- ``label``, ``score``, ``topk_labels``, ``topk_scores``, ``model``: the answer,
  and the model that gave it;
- ``fast_label``, ``fast_score``, ... ``fast_model``: the fast model's answer, always;
- ``escalation``: ``escalated`` (the strong model answered), ``not_needed`` (the
  fast model was sure enough) or ``deadline`` (it was not, but the row's deadline
  left no time for the strong model: the fast answer stands).

The strong branch is a plain sub-graph (bytes in, an answer out): any
composite with that contract can stand in for it (``strong=``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from beamzoo.core import NO_DEAD_LETTERS, Knob, KnobError, Operator, Result, register
from beamzoo.graph import Composite, Stream
from beamzoo.policies import DeadlineCheck, DeadlinePolicy, now
from beamzoo.transforms.flow import Drop, Merge, Rename
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.io import ReadFiles, read_limits
from beamzoo.transforms.postprocess import PREDICTION_FIELDS, TopK
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop
from beamzoo.zoo import ModelCard

ESCALATION = pa.field("escalation", pa.string())
BYTES = "cascade_data"  # the file's bytes, kept for the strong model's own decoding


@register("escalate")
class Escalate(Operator):
    """Route rows whose ``field`` (the fast model's score) is below ``below`` to
    ``escalate``, the rest to ``keep``; each gets an ``escalation`` column. A row with a
    ``deadline_at`` that leaves less than ``escalation_s`` is kept (``deadline``)."""

    kind = "route"
    default_id = "confidence"
    knobs = {"below": Knob(0.5, float, low=0.0, high=1.0, doc="escalate rows scored below this"),
             "field": Knob("fast_score", str),
             "escalation_s": Knob(0.0, float, low=0.0, doc="how long the strong model takes for a row")}
    ports = ("escalate", "keep")

    def __init__(self, below: float = 0.5, field: str = "fast_score", escalation_s: float = 0.0,
                 id: str | None = None):
        if isinstance(below, (int, float)) and not isinstance(below, bool) and not 0.0 <= below <= 1.0:
            raise KnobError(f"Escalate step {id or self.default_id!r}: the threshold must be between 0 and 1 "
                            f"(a confidence), got {below!r}")
        super().__init__(id, below=below, field=field, escalation_s=escalation_s)

    def configure(self):
        self.requires = pa.schema([pa.field(self.params["field"], pa.float32())])
        self.policy = DeadlinePolicy(self.params["escalation_s"])

    def output_schemas(self, inputs):
        schema = pa.schema([*inputs[0], ESCALATION])
        return {"escalate": schema, "keep": schema}

    def process(self, batch):
        unsure = batch.column(self.params["field"]).to_numpy(zero_copy_only=False) < self.params["below"]
        late = np.zeros(batch.num_rows, bool)
        if "deadline_at" in batch.schema.names:
            t = now()
            at = batch.column("deadline_at").to_numpy(zero_copy_only=False)
            late = np.array([not self.policy.can_escalate(a, t) for a in at], bool)
        up = unsure & ~late
        marks = np.where(up, "escalated", np.where(unsure, "deadline", "not_needed"))
        marked = batch.append_column(ESCALATION, pa.array(marks.tolist(), pa.string()))
        return Result({"escalate": marked.filter(pa.array(up)), "keep": marked.filter(pa.array(~up))},
                      NO_DEAD_LETTERS)


class ClassifyBytes(Composite):
    """file bytes (``data``) -> an answer: decode and resize as the card says, infer, top-k."""

    def __init__(self, card: ModelCard | str, topk: int = 5, name: str = "strong", batch_size: int = 4,
                 intra_op_threads: int = 1, max_pixels: int = 100_000_000, shrink: str = "area",
                 reduced_decode: bool = True, prefix: str = "", placement: dict | None = None, **limits):
        """``limits``: the decode step's ``time_limit`` (the read's too), ``memory_limit`` and ``isolate``."""
        self.card = ModelCard.from_param(card)
        resize = ResizeCrop.for_input(self.card.input, resize=self.card.resize, shrink=shrink,
                                      id=f"{name}_resize")
        self.steps = [DecodeImage(max_pixels=max_pixels, channels=self.card.input.channels,
                                  min_side=resize.resize if reduced_decode else None, id=f"{name}_decode",
                                  **limits),
                      resize,
                      OnnxInference(self.card, batch_size=batch_size, intra_op_threads=intra_op_threads,
                                    id=f"{name}_infer"),
                      TopK(self.card, k=topk, prefix=prefix, id=f"{name}_topk")]
        for s in self.steps:
            s.placed(**(placement or {}))

    def expand(self, stream: Stream) -> Stream:
        for s in self.steps:
            stream = stream | s
        return stream


def label_problem(fast: ModelCard, strong: ModelCard) -> str | None:
    """Why two classifiers' answers cannot stand for each other, or None."""
    a, b = fast.labels, strong.labels
    if tuple(a) == tuple(b):
        return None
    if len(a) != len(b):
        return f"{fast.ref} has {len(a)} labels and {strong.ref} {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"label {i} is {a[i]!r} for {fast.ref} and {b[i]!r} for {strong.ref}"


class Cascade(Composite):
    """paths (or file bytes, ``data``) -> one answer per row from ``fast`` or, where its top
    score is below ``below``, from ``strong`` (a card, or a composite: bytes -> an answer).

    ``escalation_s``: with a ``Deadline`` upstream, how long an escalation takes; a row
    whose deadline leaves less keeps the fast answer. ``placement``: hints per tier,
    e.g. ``{"fast": {"tier": "device"}, "strong": {"tier": "cloud", "device": "gpu"}}``.
    """

    def __init__(self, fast: ModelCard | str, strong: ModelCard | str | Composite, below: float = 0.5,
                 topk: int = 5, batch_size: int = 4, intra_op_threads: int = 1, max_pixels: int = 100_000_000,
                 max_bytes: int = 256 << 20, shrink: str = "area", reduced_decode: bool = True,
                 escalation_s: float = 0.0, placement: dict | None = None, id: str = "cascade", **limits):
        from beamzoo.pipeline import classifier_problem
        self.id = id
        self.fast = ModelCard.from_param(fast)
        kw = dict(topk=topk, batch_size=batch_size, intra_op_threads=intra_op_threads, max_pixels=max_pixels,
                  shrink=shrink, reduced_decode=reduced_decode, **limits)
        placement = placement or {}
        unknown = sorted(set(placement) - {"fast", "strong"})
        if unknown:
            raise KnobError(f"Cascade {id!r}: placement is per branch ('fast', 'strong'), got {unknown[0]!r}")
        composite = isinstance(strong, Composite)
        self.strong = getattr(strong, "card", None) if composite else ModelCard.from_param(strong)
        for role, card in (("fast", self.fast), ("strong", self.strong)):
            problem = card and classifier_problem(card)
            if problem:
                raise KnobError(f"Cascade {id!r}: the {role} model {card.ref} {problem}")
        problem = self.strong and label_problem(self.fast, self.strong)
        if problem:
            raise KnobError(f"Cascade {id!r}: the two models must answer with the same labels, but {problem}")
        self.strong_branch = strong if composite else ClassifyBytes(self.strong, name="strong",
                                                                    placement=placement.get("strong"), **kw)
        self.read = ReadFiles(max_bytes=max_bytes, **read_limits(limits)).placed(**placement.get("fast", {}))
        self.keep_bytes = Rename({"data": BYTES}, copy=True, id="keep_bytes").placed(**placement.get("fast", {}))
        self.fast_branch = ClassifyBytes(self.fast, name="fast", prefix="fast_", placement=placement.get("fast"),
                                         **kw)
        self.route = Escalate(below, escalation_s=escalation_s, id="confidence").placed(**placement.get("fast", {}))
        self.below, self.placement = below, placement

    def expand(self, stream: Stream) -> Stream:
        if "data" not in stream.schema.names:
            stream = stream | self.read
        stream = stream | self.keep_bytes
        decoded = stream | self.fast_branch.steps[0] | self.fast_branch.steps[1]
        if "deadline_at" in decoded.schema.names:
            decoded = decoded | DeadlineCheck(before="fast_infer", id="fast_deadline").placed(
                **self.placement.get("fast", {}))
        scored = decoded | self.fast_branch.steps[2] | self.fast_branch.steps[3]
        branches = scored | self.route
        fast, strong = self.placement.get("fast", {}), self.placement.get("strong", {})
        strong = branches.escalate | Rename({BYTES: "data"}, id="strong_bytes").placed(**strong) | self.strong_branch
        answer = {f"fast_{f.name}": f.name for f in PREDICTION_FIELDS}
        kept = (branches.keep | Rename(answer, copy=True, id="fast_answer").placed(**fast)
                | Drop([BYTES], id="drop_bytes").placed(**fast))
        return (strong, kept) | Merge(id="answers")


# ------------------------------------------------------------------ choosing a threshold

@dataclass(frozen=True)
class Choice:
    threshold: float
    escalated: float  # the fraction of the sample escalated
    agreement: float  # the fraction answered as the strong model answers
    rows: int

    def line(self, strong: str, target: float) -> str:
        return (f"--escalate_agreement {target:g}: escalating below {self.threshold:.4f}, chosen on "
                f"{self.rows} calibration images (escalates {self.escalated:.1%}, agrees with {strong} "
                f"on {self.agreement:.1%})")


def outcomes(fast_scores, fast_labels, strong_labels, threshold: float) -> tuple[float, float]:
    """(fraction escalated, agreement with the strong model) of a threshold on a sample."""
    s = np.asarray(fast_scores, np.float64)
    up = s < threshold
    same = np.asarray(fast_labels, object) == np.asarray(strong_labels, object)
    return float(up.mean()) if len(s) else 0.0, float((up | same).mean()) if len(s) else 1.0


def calibrate(fast_scores, fast_labels, strong_labels, agreement: float) -> Choice:
    """The cheapest threshold (fewest rows escalated) whose answers agree with the strong
    model's on at least ``agreement`` of the sample (NoScope-style). The candidates are the
    sample's own scores: escalating below the k-th lowest escalates k rows."""
    if not 0.0 <= agreement <= 1.0:
        raise KnobError(f"--escalate_agreement must be between 0 and 1, got {agreement!r}")
    s = np.asarray(fast_scores, np.float64)
    if not len(s):
        raise KnobError("no calibration images could be scored by both models")
    for t in [0.0, *np.unique(s), 1.0]:
        escalated, agrees = outcomes(s, fast_labels, strong_labels, t)
        if agrees >= agreement - 1e-12:
            return Choice(float(min(t, 1.0)), escalated, agrees, len(s))
    return Choice(1.0, *outcomes(s, fast_labels, strong_labels, 1.0), len(s))


def sample_answers(card: ModelCard, paths: list[str], shrink: str = "area") -> tuple[list, list, list]:
    """(paths answered, labels, top scores) of ``card`` on ``paths``, by beamzoo's own steps;
    files that fail are left out."""
    from beamzoo.transforms.sources import Files
    batch = Files("x").to_batch(list(paths)).ok
    steps = [ReadFiles(), *ClassifyBytes(card, topk=1, name="calibrate", shrink=shrink).steps]
    for op in steps:
        op.setup()
        batch = op.process(batch).ok
    return (batch.column("path").to_pylist(), batch.column("label").to_pylist(),
            batch.column("score").to_pylist())


def calibration_sample(paths: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``paths`` chosen at random (seeded), or all of them."""
    paths = sorted(paths)
    if len(paths) <= n:
        return paths
    rng = np.random.default_rng(seed)
    return sorted(paths[i] for i in rng.choice(len(paths), n, replace=False))


def choose_threshold(fast: ModelCard, strong: ModelCard, paths: list[str], agreement: float, n: int = 200,
                     seed: int = 0, shrink: str = "area") -> Choice:
    """Calibrate on ``n`` of ``paths``: both models on each, then ``calibrate``."""
    sample = calibration_sample(paths, n, seed)
    fp, fl, fs = sample_answers(fast, sample, shrink)
    sp, sl, _ = sample_answers(strong, sample, shrink)
    strong_of = dict(zip(sp, sl))
    both = [(label, score, strong_of[p]) for p, label, score in zip(fp, fl, fs) if p in strong_of]
    return calibrate([b[1] for b in both], [b[0] for b in both], [b[2] for b in both], agreement)

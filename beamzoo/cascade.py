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

The branches are composites of their own (``cascade/fast/...``, ``cascade/strong/...``);
any composite that turns file bytes into an answer can stand in for the strong one
(``strong=``). ``choose_threshold`` picks ``below`` on a calibration sample, running
both models with the in-thread runner.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from beamzoo.classify import STEP_KNOBS, ClassifyBytes, classifier
from beamzoo.core.graph import Composite, GraphBuilder, Stream
from beamzoo.core.knobs import Knob, KnobError, pick
from beamzoo.runners.inline import InlineRunner
from beamzoo.transforms.escalate import Escalate
from beamzoo.transforms.flow import Drop, Merge, Rename
from beamzoo.transforms.io import ReadFiles, encodable
from beamzoo.transforms.model import MODEL
from beamzoo.transforms.postprocess import PREDICTION_FIELDS
from beamzoo.transforms.serving import Responses
from beamzoo.transforms.sources import Rows
from beamzoo.zoo import ModelCard, card_param

BYTES = "cascade_data"  # the file's bytes, kept for the strong model's own decoding
CALIBRATION_IMAGES = Knob(200, int, low=1, results=False,
                          doc="images in the calibration sample that chooses an escalation threshold")


def label_problem(fast: ModelCard, strong: ModelCard) -> str | None:
    """Why two classifiers' answers cannot stand for each other, or None."""
    a, b = fast.labels, strong.labels
    if tuple(a) == tuple(b):
        return None
    if len(a) != len(b):
        return f"{fast.ref} has {len(a)} labels and {strong.ref} {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"label {i} is {a[i]!r} for {fast.ref} and {b[i]!r} for {strong.ref}"


def _strong(value):
    return value if isinstance(value, Composite) else card_param(value)


class Cascade(Composite):
    """paths (or file bytes, ``data``) -> one answer per row from ``fast`` or, where its top
    score is below ``below``, from ``strong`` (a card, or a composite: bytes -> an answer).

    ``escalation_s``: with a ``Deadline`` upstream, how long an escalation takes; a row
    whose deadline leaves less keeps the fast answer. ``placement``: hints per branch,
    e.g. ``{"fast": {"tier": "device"}, "strong": {"tier": "cloud", "device": "gpu"}}``.
    """

    default_id = "cascade"
    knobs = {"fast": MODEL.but(doc="the fast model, on every image"),
             "strong": Knob(None, object, required=True, convert=_strong,
                            doc="the stronger model (zoo name or card file), or a composite: file bytes -> an answer"),
             **pick(Escalate, "below", "escalation_s"), **pick(ReadFiles, "max_bytes"),
             **{k: v for k, v in STEP_KNOBS.items() if k != "prefix"},
             "placement": Knob(None, dict, results=False, doc="hints per branch: {'fast': {...}, 'strong': {...}}")}
    positional = ("fast", "strong")

    def configure(self):
        p = self.params
        placement = p["placement"] or {}
        unknown = sorted(set(placement) - {"fast", "strong"})
        if unknown:
            raise KnobError(f"Cascade {self.id!r}: placement is per branch ('fast', 'strong'), got {unknown[0]!r}")
        self.placement = placement
        self.fast = classifier(p["fast"], f"Cascade {self.id!r}: the fast model")
        composite = isinstance(p["strong"], Composite)
        self.strong = getattr(p["strong"], "card", None) if composite else \
            classifier(p["strong"], f"Cascade {self.id!r}: the strong model")
        problem = self.strong and label_problem(self.fast, self.strong)
        if problem:
            raise KnobError(f"Cascade {self.id!r}: the two models must answer with the same labels, but {problem}")
        steps = {k: p[k] for k in STEP_KNOBS if k != "prefix"}
        self.fast_branch = ClassifyBytes(self.fast, **steps, prefix="fast_", placement=placement.get("fast"),
                                         id="fast")
        self.strong_branch = p["strong"] if composite else ClassifyBytes(
            self.strong, **steps, placement=placement.get("strong"), check_deadline=False, id="strong")
        self.below = p["below"]

    def expand(self, stream: Stream) -> Stream:
        p, fast, strong = self.params, self.placement.get("fast", {}), self.placement.get("strong", {})
        if "data" not in stream.schema.names:
            stream = stream | ReadFiles(max_bytes=p["max_bytes"], time_limit=p["time_limit"]).placed(**fast)
        stream = stream | Rename({"data": BYTES}, copy=True, id="keep_bytes").placed(**fast)
        scored = stream | self.fast_branch
        branches = scored | Escalate(p["below"], escalation_s=p["escalation_s"]).placed(**fast)
        answered = branches.escalate | Rename({BYTES: "data"}, id="strong_bytes").placed(**strong) | self.strong_branch
        answer = {f"fast_{f.name}": f.name for f in PREDICTION_FIELDS}
        kept = (branches.keep | Rename(answer, copy=True, id="fast_answer").placed(**fast)
                | Drop([BYTES], id="drop_bytes").placed(**fast))
        return (answered, kept) | Merge(id="answers")


# ------------------------------------------------------------------ choosing a threshold

@dataclass(frozen=True)
class Choice:
    threshold: float
    escalated: float  # the fraction of the sample escalated
    agreement: float  # the fraction answered as the strong model answers
    rows: int
    failed: int = 0  # images of the sample that could not be scored by both models

    def line(self, strong: str, target: float) -> str:
        left_out = f"; {self.failed} more could not be scored and were left out" if self.failed else ""
        return (f"--escalate_agreement {target:g}: escalating below {self.threshold:.4f}, chosen on "
                f"{self.rows} calibration images (escalates {self.escalated:.1%}, agrees with {strong} "
                f"on {self.agreement:.1%}{left_out})")


def outcomes(fast_scores, fast_labels, strong_labels, threshold: float) -> tuple[float, float]:
    """(fraction escalated, agreement with the strong model) of a threshold on a sample."""
    s = np.asarray(fast_scores, np.float64)
    up = s < threshold
    same = np.asarray(fast_labels, object) == np.asarray(strong_labels, object)
    return float(up.mean()) if len(s) else 0.0, float((up | same).mean()) if len(s) else 1.0


def calibrate(fast_scores, fast_labels, strong_labels, agreement: float, failed: int = 0) -> Choice:
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
            return Choice(float(min(t, 1.0)), escalated, agrees, len(s), failed)
    return Choice(1.0, *outcomes(s, fast_labels, strong_labels, 1.0), len(s), failed)


def sample_answers(card: ModelCard, paths: list[str], **knobs) -> tuple[list, list, list, int]:
    """(paths answered, labels, top scores, how many failed) of ``card`` on ``paths``: the steps of
    a run (``knobs``: ``ClassifyBytes``'s), run by the in-thread runner; files that fail are dead
    letters, counted."""
    good = [p for p in paths if encodable(p)]
    b = GraphBuilder()
    answers = b | Rows([{"id": p, "path": p} for p in good]) | ReadFiles() | ClassifyBytes(card, **{**knobs, "topk": 1})
    answers | Responses()
    runner = InlineRunner()
    runner.run(b.graph)
    rows = pa.Table.from_batches(runner.answers["responses"]) if runner.answers.get("responses") else None
    failed = len(paths) - len(good) + sum(d.num_rows for d in runner.dead)
    if rows is None:
        return [], [], [], failed
    return rows.column("path").to_pylist(), rows.column("label").to_pylist(), rows.column("score").to_pylist(), failed


def calibration_sample(paths: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``paths`` chosen at random (seeded), or all of them."""
    paths = sorted(paths)
    if len(paths) <= n:
        return paths
    rng = np.random.default_rng(seed)
    return sorted(paths[i] for i in rng.choice(len(paths), n, replace=False))


def choose_threshold(fast: ModelCard, strong: ModelCard, paths: list[str], agreement: float,
                     n: int = CALIBRATION_IMAGES.default, seed: int = 0, **knobs) -> Choice:
    """Calibrate on ``n`` of ``paths``: both models on each (``knobs``: the steps' knobs of
    ``ClassifyBytes``, as the run has them), then ``calibrate``."""
    sample = calibration_sample(paths, n, seed)
    fp, fl, fs, _ = sample_answers(fast, sample, **knobs)
    sp, sl, _, _ = sample_answers(strong, sample, **knobs)
    strong_of = dict(zip(sp, sl))
    both = [(label, score, strong_of[p]) for p, label, score in zip(fp, fl, fs) if p in strong_of]
    return calibrate([b[1] for b in both], [b[0] for b in both], [b[2] for b in both], agreement,
                     failed=len(sample) - len(both))

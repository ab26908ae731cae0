"""Gates in a pipeline: the rows a gate diverts to a review sink, and label profiles.

The gate itself is a step (``beamzoo.transforms.gate``: its metrics, actions and
``--gate`` specs); here is what a pipeline adds around it: ``with_gates`` puts a
gate per spec after a stream and writes what they divert, ``save_profile`` and
``load_profile`` keep the label distribution of a run for ``label_distance``.
"""
from __future__ import annotations

import json
from collections import Counter

import pyarrow.dataset as ds

from beamzoo.core.knobs import KnobError
from beamzoo.transforms.flow import Merge
from beamzoo.transforms.gate import Gate
from beamzoo.transforms.sinks import WriteParquet


# ------------------------------------------------------------------ profiles

def label_profile(labels: list[str]) -> dict:
    """The label distribution of a run's answers: what ``label_distance`` compares with."""
    counts = Counter(labels)
    n = len(labels)
    return {"beamzoo_label_profile": 1, "rows": n,
            "labels": {k: c / n for k, c in sorted(counts.items())} if n else {}}


def save_profile(predictions_dir: str, path: str) -> dict:
    """Write the label profile of the Parquet predictions in ``predictions_dir`` to ``path``."""
    labels = ds.dataset(predictions_dir, format="parquet").to_table(columns=["label"]).column("label")
    profile = label_profile([x for x in labels.to_pylist() if x is not None])
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
    return profile


def load_profile(path: str) -> dict[str, float]:
    """The {label: fraction} of a saved profile; refuses a file that is not one."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise KnobError(f"{path} is not a label profile (not JSON: {exc})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("beamzoo_label_profile") != 1 or not isinstance(labels, dict)
            or not labels or not all(isinstance(v, (int, float)) and v >= 0 for v in labels.values())):
        raise KnobError(f"{path} is not a label profile (write one with --save_profile)")
    return {str(k): float(v) for k, v in labels.items()}


def with_gates(stream, gates: list[dict], review_path: str, **sink_kw):
    """``stream`` through a ``Gate`` per keyword dict (ids ``gate``, ``gate2``, ...); the
    rows any of them diverts go to one ``review`` sink at ``review_path``."""
    review = []
    for i, kw in enumerate(gates):
        out = stream | Gate(**{"id": "gate" if i == 0 else f"gate{i + 1}", **kw})
        if kw.get("action") == "divert":
            review.append(out.review)
            out = out.out
        stream = out
    if review:
        merged = review[0] if len(review) == 1 else tuple(review) | Merge(id="review_rows")
        merged | WriteParquet(review_path, id="write_review", **sink_kw)
    return stream

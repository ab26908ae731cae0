"""Classify the images listed in a text file with an ordinary Beam pipeline.

    python pipelines/classify_beam.py --paths paths.txt --output out/preds
    python pipelines/classify_beam.py --paths paths.txt --output out/preds --runner=FlinkRunner

Reads one path per line (``beam.io.ReadFromText``), classifies with
beamzoo's transforms, and writes JSON lines with ``beam.io.WriteToText``:
``PREFIX-predictions-*.jsonl`` (path, label, score, topk_labels, topk_scores,
model) and ``PREFIX-dead_letters-*.jsonl`` (path, stage, error, id). Any Beam option
passes through; ``beamzoo.beam_options`` readies DirectRunner and FlinkRunner
(embedded ``[local]`` unless --flink_master says otherwise).
"""
from __future__ import annotations

import json
import os
import sys

import apache_beam as beam

import beamzoo
from beamzoo.cli_args import Parser, check_leftovers
from beamzoo.pipeline import user_errors
from beamzoo.runners.options import runner_of
from beamzoo import beam as bz

FIELDS = ("path", "label", "score", "topk_labels", "topk_scores", "model")


def outputs(output: str) -> tuple[str, str]:
    """The prefixes of the two outputs. Neither may start with the other plus "-":
    before it renames its files, a WriteToText deletes whatever matches its own
    ``PREFIX-*-of-NNNNN.jsonl``, which for PREFIX "out/preds" would be the dead letters
    "out/preds-dead_letter-00000-of-00002.jsonl" written a moment before."""
    return f"{output}-predictions", f"{output}-dead_letters"


def to_json(row) -> str:
    return json.dumps({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in row._asdict().items()})


def dead_to_json(row) -> str:
    return json.dumps({"path": row.source, "stage": row.stage, "error": row.error, "id": row.id})


def build(p: beam.Pipeline, paths: str, output: str, **knobs) -> None:
    """``knobs``: bz.Classify's (model, topk, ...), those given; the rest keep their defaults."""
    predictions, dead_letters = outputs(output)
    preds = (p
             | "ReadPaths" >> beam.io.ReadFromText(paths)
             | "NoBlanks" >> beam.Filter(lambda line: line.strip() != "")
             | "Absolute" >> beam.Map(lambda line: os.path.abspath(line.strip()))
             | "Classify" >> bz.Classify(**knobs))
    (preds
     | "Columns" >> beam.Select(*FIELDS)
     | "PredictionJson" >> beam.Map(to_json)
     | "WritePredictions" >> beam.io.WriteToText(predictions, file_name_suffix=".jsonl"))
    (bz.dead_letters(preds)
     | "DeadLetterJson" >> beam.Map(dead_to_json)
     | "WriteDeadLetters" >> beam.io.WriteToText(dead_letters, file_name_suffix=".jsonl"))


def main(argv=None) -> int:
    parser = Parser(description=__doc__)  # an argparse parser whose mistakes are one error: line
    parser.add_argument("--paths", required=True, help="text file: one image path per line")
    parser.add_argument("--output", required=True, help="prefix of the JSON-lines outputs")
    parser.add_argument("--model", help="zoo model NAME[:VERSION], or the path of a card file "
                                        "(default efficientnet_lite0)")
    parser.add_argument("--topk", type=int, help="labels kept per image (default 5, or all of a model with fewer)")
    args, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    check_leftovers(parser, runner_of(beam_args), beam_args)  # what neither this file nor Beam takes
    try:
        with beamzoo.beam_options(beam_args) as options, beam.Pipeline(options=options) as p:
            knobs = {k: v for k, v in (("model", args.model), ("topk", args.topk)) if v is not None}
            build(p, os.path.abspath(args.paths), os.path.abspath(args.output), **knobs)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Read the text in a set of images (PP-OCRv4); results to Parquet.

    python pipelines/ocr_images.py --input 'scans/**/*.png' --output out/
    python pipelines/ocr_images.py --input ... --output out/ --runner=EdgeRunner
    python pipelines/ocr_images.py --input ... --output out/ --runner=FlinkRunner --flink_master=[local]
    python pipelines/ocr_images.py --input ... --output out/ --runner=edge --config tuned.yaml --adapt

Each image gives one row of OUT/predictions/*.parquet: id, path, text (the
lines in reading order, one row of text a line), lines (text, score and box of
each region read) and children (the regions found). An image without text has
an empty text. Files that cannot be read, and single regions that cannot be
cropped or recognized (with their image's parent_id), go to
OUT/dead_letter/*.parquet; OUT/report.html charts the run. The models
(PP-OCRv4 detection and recognition, the PP-OCR angle classifier) come from the
rapidocr-onnxruntime 1.4.4 wheel, fetched once from PyPI into the beamzoo cache
and pinned by sha256. With --config FILE (``beamzoo tune --ocr``) the file's
knobs are the defaults of these flags, a flag given here wins; with --adapt
the edge runner keeps each step within the file's latency budgets. Beam
options (--direct_num_workers, --parallelism, ...) go to Beam runners;
anything else is refused.
"""
from __future__ import annotations

import logging
import os
import sys

from beamzoo.cli_args import (FLAG_NAMES, Parser, add_config, add_knobs, add_runner, check_leftovers,
                               config_budgets, given)
from beamzoo.core.knobs import pick
from beamzoo.core.limits import MAX_DEAD_FRACTION, TooManyDeadLetters
from beamzoo.ocr import ReadText, ocr_images
from beamzoo.pipeline import TOO_MANY_DEAD, interrupted, on_sigterm, run_command, user_errors
from beamzoo.runners.edge import EdgeRunner
from beamzoo.transforms.resume import RESUME_BY

FLAGS = FLAG_NAMES
EDGE = pick(EdgeRunner, "workers", "progress", "adapt")


def parser() -> Parser:
    p = Parser(prog=os.path.basename(__file__), description=__doc__)
    p.add_argument("--input", required=True, help="glob of image files ('**' recurses; quote it) or a directory")
    p.add_argument("--output", required=True, help="folder for the results: OUTPUT/predictions, OUTPUT/dead_letter, "
                                                       "OUTPUT/report.html")
    add_runner(p)
    add_config(p, "ocr")
    add_knobs(p, ReadText.knobs, FLAGS)
    add_knobs(p, EDGE, {"progress": "no_progress"})
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --output: inputs already done there are skipped")
    add_knobs(p, {"resume_by": RESUME_BY})
    p.add_argument("--profile", metavar="FILE", help="write the run's per-step metrics to FILE (JSON)")
    add_knobs(p, {"max_dead_fraction": MAX_DEAD_FRACTION})
    return p


def parse(argv: list[str]):
    p = parser()
    args, rest = p.parse_known_args(argv)
    check_leftovers(p, args.runner, rest, "'scans/*.png'")
    if args.isolate is False and (args.time_limit or args.memory_limit):
        p.error("--no_isolation turns the limits off: give it or --time_limit/--memory_limit, not both")
    return args, rest


def main(argv=None) -> int:
    args, beam_args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR)
    on_sigterm()
    progress = args.progress is not False
    try:
        graph = ocr_images(args.input, args.output, **given(args, ReadText.knobs))
        edge = EdgeRunner(**given(args, pick(EDGE, "workers", "adapt")), progress=progress, **config_budgets(args))
        stats = run_command(graph, args, beam_args, edge, progress)
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except TooManyDeadLetters as exc:
        print(f"error: {exc}", file=sys.stderr)
        return TOO_MANY_DEAD
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    print(f"{stats.inputs / stats.seconds:.1f} images/s over {stats.seconds:.1f} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

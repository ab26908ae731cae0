"""Read the text in a set of images (PP-OCRv4); results to Parquet.

    python pipelines/ocr_images.py --input 'scans/**/*.png' --output out/
    python pipelines/ocr_images.py --input ... --output out/ --runner=EdgeRunner
    python pipelines/ocr_images.py --input ... --output out/ --runner=FlinkRunner --flink_master=[local]

Each image gives one row of OUT/predictions/*.parquet: id, path, text (the
lines in reading order, one row of text a line), lines (text, score and box of
each region read) and children (the regions found). An image without text has
an empty text. Files that cannot be read, and single regions that cannot be
cropped or recognized (with their image's parent_id), go to
OUT/dead_letter/*.parquet. The models (PP-OCRv4 detection and recognition, the
PP-OCR angle classifier) come from the rapidocr-onnxruntime 1.4.4 wheel, fetched
once from PyPI into the beamzoo cache and pinned by sha256. Beam options
(--direct_num_workers, --parallelism, ...) go to Beam runners; anything else is
refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from beamzoo.cli_args import check_leftovers, number
from beamzoo.pipeline import interrupted, run, user_errors
from beamzoo.runners import EdgeRunner
from beamzoo.transforms.ocr.pipeline import ocr_images


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", required=True, help="glob of image files ('**' recurses; quote it) or a directory")
    p.add_argument("--output", required=True, help="folder for the results: OUTPUT/predictions, OUTPUT/dead_letter")
    p.add_argument("--runner", default="DirectRunner",
                   help="DirectRunner (default), EdgeRunner (no Beam) or FlinkRunner")
    p.add_argument("--min_score", type=number(float, 0, 1), default=0.5,
                   help="leave out lines recognized with a lower confidence (default 0.5)")
    p.add_argument("--batch_size", type=number(int, 1), default=16, help="regions per recognition call")
    p.add_argument("--max_ratio", type=number(float, 1), default=256.0,
                   help="refuse regions longer than this many times their height (default 256)")
    p.add_argument("--max_pixels", type=number(int, 1), default=100_000_000,
                   help="refuse images with more pixels than this (decompression bombs)")
    p.add_argument("--max_bytes", type=number(int, 1), default=256 << 20, help="refuse larger files")
    p.add_argument("--threads", type=number(int, 0), default=1,
                   help="onnxruntime intra-op threads per session (1: workers run side by side; 0: all cores)")
    p.add_argument("--workers", type=number(int, 1), default=None, help="edge runner: worker threads")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --output: inputs already done there are skipped")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def parse(argv: list[str]):
    p = parser()
    args, rest = p.parse_known_args(argv)
    check_leftovers(p, args.runner, rest, "'scans/*.png'")
    return args, rest


def main(argv=None) -> int:
    args, beam_args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR)
    try:
        graph = ocr_images(args.input, args.output, min_score=args.min_score, rec_batch_size=args.batch_size,
                           max_ratio=args.max_ratio, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                           intra_op_threads=args.threads)
        edge = EdgeRunner(workers=args.workers, progress=not args.no_progress)
        stats = run(graph, args.runner, beam_args, edge=edge, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        interrupted()
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    print(f"{stats.inputs / stats.seconds:.1f} images/s over {stats.seconds:.1f} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch-score a set of images with an ImageNet classifier; results to Parquet.

    python pipelines/score_images.py --input 'photos/**/*.jpg' --output out/
    python pipelines/score_images.py --input ... --output out/ --runner=EdgeRunner
    python pipelines/score_images.py --input ... --output out/ --runner=FlinkRunner --flink_master=[local]

Without --input it scores a sample set of real photographs that ship in
scikit-image and scikit-learn. Options it does not know go to Beam.
Writes OUT/predictions-*.parquet and OUT/dead_letter-*.parquet.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from beamzoo import zoo
from beamzoo.pipeline import UserError, run, score_images
from beamzoo.runners import EdgeRunner
from beamzoo.transforms.preprocess import SHRINK_FILTERS


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="glob of image files ('**' recurses) or a directory; "
                                   "default: a sample set of real photographs")
    p.add_argument("--output", required=True, help="directory for the Parquet results")
    p.add_argument("--runner", default="DirectRunner",
                   help="DirectRunner (default), EdgeRunner, FlinkRunner or another Beam runner")
    p.add_argument("--model", default="efficientnet_lite0", help="model name in the zoo")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=4, help="images per inference call")
    p.add_argument("--max_pixels", type=int, default=100_000_000,
                   help="refuse images with more pixels than this (decompression bombs)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads per session (1: workers run inference side by "
                        "side; 0: all cores for each call)")
    p.add_argument("--shrink", choices=sorted(SHRINK_FILTERS), default="area",
                   help="resize filter when shrinking: area (exact area average) or linear "
                        "(bilinear: a seventh of the resize cost, a little more aliasing)")
    p.add_argument("--workers", type=int, default=None, help="edge runner: decode threads")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --output: inputs already scored there are skipped")
    p.add_argument("--no_progress", action="store_true", help="edge runner: no progress bar")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, beam_args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR)
    if args.input is None:
        from beamzoo.samples import make_sample_set
        args.input = str(make_sample_set(os.path.join(args.output, "_samples")))
        print(f"no --input given: scoring the sample photographs copied to {args.input}")
    try:
        card = zoo.get(args.model)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    graph = score_images(args.input, card, k=args.topk, batch_size=args.batch_size,
                         max_pixels=args.max_pixels, intra_op_threads=args.threads, shrink=args.shrink)
    edge = EdgeRunner(workers=args.workers, progress=not args.no_progress)
    try:
        stats = run(graph, args.output, args.runner, beam_args, edge=edge, resume=args.resume)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    first = "" if stats.first_result_s is None else f" (first result after {stats.first_result_s:.1f} s)"
    print(f"{stats.inputs / stats.seconds:.1f} images/s over {stats.seconds:.1f} s{first}; "
          f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch-score a set of images with an ImageNet classifier; results to Parquet.

    python pipelines/score_images.py --input 'photos/**/*.jpg' --output out/
    python pipelines/score_images.py --input ... --output out/ --runner=EdgeRunner
    python pipelines/score_images.py --input ... --output out/ --runner=FlinkRunner --flink_master=[local]
    python pipelines/score_images.py --export bundle/          # the graph and its model, for a device

Without --input it scores a sample set of real photographs that ship in
scikit-image and scikit-learn. Writes OUT/predictions/*.parquet and
OUT/dead_letter/*.parquet. Beam options (--direct_num_workers,
--parallelism, ...) go to Beam runners; anything else is refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from beamzoo import zoo
from beamzoo.cli_args import check_leftovers, number, seconds
from beamzoo.core import KnobError
from beamzoo.pipeline import classifier_problem, interrupted, run, score_images, user_errors
from beamzoo.runners import EdgeRunner
from beamzoo.transforms.preprocess import SHRINK_FILTERS


def size(text: str) -> int:
    """Bytes, or a number with K, M or G (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or e.g. 512M, 2G)") from None
    if value < 64 << 20:
        raise argparse.ArgumentTypeError(f"must be at least 64M, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", help="glob of image files ('**' recurses; quote it) or a directory; "
                                   "default: a sample set of real photographs")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="folder for the results: OUTPUT/predictions, OUTPUT/dead_letter")
    out.add_argument("--export", metavar="DIR", help="write the graph and its model files as a bundle "
                                                     "to DIR instead of running (run it with `beamzoo run`)")
    p.add_argument("--runner", default="DirectRunner",
                   help="DirectRunner (default), EdgeRunner (no Beam) or FlinkRunner")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="NAME or NAME:VERSION from the zoo (default efficientnet_lite0, "
                                       "NAME alone: its newest version), or the path of a card file")
    model.add_argument("--select", metavar="SELECTOR",
                       help="the cheapest model that matches, e.g. 'task=image-classification,imagenet_top1>=0.76'")
    p.add_argument("--zoo", action="append", default=[], metavar="DIR",
                   help="a model repository (<DIR>/<name>/<version>/card.yaml) beside the built-ins; "
                        "also BEAMZOO_ZOO")
    p.add_argument("--topk", type=number(int, 1), default=5, help="labels kept per image (default 5)")
    p.add_argument("--batch_size", type=number(int, 1), default=4, help="images per inference call")
    p.add_argument("--max_pixels", type=number(int, 1), default=100_000_000,
                   help="refuse images with more pixels than this (decompression bombs)")
    p.add_argument("--max_bytes", type=number(int, 1), default=256 << 20, help="refuse larger files")
    p.add_argument("--time_limit", type=seconds(0.01), default=None,
                   help="seconds one image may take to read, and (wall and CPU) to sniff and decode; over "
                        "it, it is a dead letter (default 5)")
    p.add_argument("--memory_limit", type=size, default=None,
                   help="memory one image may take to decode, e.g. 512M or 2G; over it, it is a dead "
                        "letter (default 2G, less on a machine with under 4G per core)")
    p.add_argument("--no_isolation", action="store_true",
                   help="decode in the runner's own process, without the decode time and memory limits "
                        "(reads keep their 5 s limit)")
    p.add_argument("--threads", type=number(int, 0), default=1,
                   help="onnxruntime intra-op threads per session (1: workers run inference side by "
                        "side; 0: all cores for each call)")
    p.add_argument("--shrink", choices=sorted(SHRINK_FILTERS), default="area",
                   help="resize filter when shrinking: area (exact area average) or linear "
                        "(bilinear: a seventh of the resize cost, a little more aliasing)")
    p.add_argument("--workers", type=number(int, 1), default=None, help="edge runner: worker threads")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --output: inputs already done there are skipped")
    p.add_argument("--derived_only", action="store_true",
                   help="write only derived columns: no raw bytes, images or tensors of an input")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_cascade_and_gates(p)
    return p


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def add_cascade_and_gates(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("cascade", "a fast model on every image, a stronger one where it is unsure")
    c.add_argument("--escalate", metavar="MODEL", help="the stronger model (zoo name or card file)")
    t = c.add_mutually_exclusive_group()
    t.add_argument("--escalate_below", type=float, metavar="X",
                   help="escalate images whose top score is below X (0..1; default 0.5)")
    t.add_argument("--escalate_agreement", type=unit_interval, metavar="F",
                   help="choose the threshold: the cheapest whose answers agree with the stronger model on "
                        "at least F of a calibration sample of the inputs (printed)")
    c.add_argument("--calibration_images", type=number(int, 1), default=200, metavar="N",
                   help="images in the calibration sample (default 200)")
    c.add_argument("--deadline", type=seconds(0), metavar="S",
                   help="each image's deadline, S seconds after it is listed: one that cannot be escalated "
                        "in time keeps the fast answer (escalation=deadline); one with no answer by then is "
                        "a dead letter of stage deadline")
    c.add_argument("--escalation_s", type=seconds(0), default=0.0, metavar="S",
                   help="how long the stronger model takes for an image (with --deadline)")
    g = p.add_argument_group("gates", "watch the answers; see the README's section on gates")
    g.add_argument("--gate", action="append", default=[], metavar="SPEC",
                   help="METRIC OP X[:ACTION], e.g. 'mean_confidence<0.3:stop', 'fraction_below(0.2)>0.5:divert', "
                        "'label_distance>0.4:warn', 'bias(group)<0.8:warn'; ACTION warn (default), divert "
                        "(to OUTPUT/review) or stop (exit code 3; edge runner)")
    g.add_argument("--gate_window", type=number(int, 1), default=100, metavar="N",
                   help="rows each gate's metric is computed over (default 100)")
    g.add_argument("--gate_profile", metavar="FILE", help="the reference label profile of label_distance")
    g.add_argument("--save_profile", metavar="FILE",
                   help="after the run, save the label profile of its predictions to FILE")


def parse(argv: list[str]):
    p = parser()
    args, rest = p.parse_known_args(argv)
    check_leftovers(p, args.runner, rest, "'photos/*.jpg'")
    card = pick_model(p, args)
    if (args.escalate_below is not None or args.escalate_agreement is not None) and not args.escalate:
        p.error("--escalate_below and --escalate_agreement need --escalate MODEL")
    args.escalate_card = None
    if args.escalate:
        try:
            args.escalate_card = zoo.get(args.escalate)
        except (zoo.UnknownModel, zoo.CardError, zoo.ModelIntegrityError) as exc:
            p.error(f"--escalate: {exc}")
    if args.topk > len(card.labels):
        p.error(f"--topk must be between 1 and {len(card.labels)} (the labels of {card.ref}), got {args.topk}")
    if args.no_isolation and (args.time_limit or args.memory_limit):
        p.error("--no_isolation turns the limits off: give it or --time_limit/--memory_limit, not both")
    return args, rest, card


def pick_model(p: argparse.ArgumentParser, args) -> zoo.ModelCard:
    """The card of --model or --select (refusing what cannot classify images)."""
    try:
        for d in args.zoo:
            zoo.add_repository(d)
        if args.select:
            matches = zoo.select(**zoo.parse_selector(args.select))
            card = matches[0]
            print(f"--select picked {card.ref}, the cheapest of {len(matches)} matching: "
                  f"{', '.join(c.ref for c in matches)}")
        else:
            card = zoo.get(args.model or "efficientnet_lite0")
    except (zoo.UnknownModel, zoo.CardError, zoo.SelectorError, zoo.ModelIntegrityError) as exc:
        p.error(f"--{'select' if args.select else 'model'}: {exc}")
    problem = classifier_problem(card)
    if problem:
        p.error(f"--{'select' if args.select else 'model'}: {card.ref} {problem}")
    return card


def limits(args) -> dict:
    """The decode step's limits the command line sets."""
    given = {"time_limit": args.time_limit, "memory_limit": args.memory_limit}
    return {"isolate": False} if args.no_isolation else {k: v for k, v in given.items() if v is not None}


def main(argv=None) -> int:
    args, beam_args, card = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR)
    try:
        if args.export:
            args.input = args.input or "."  # a bundle is given its input when it runs
        elif args.input is None:
            from beamzoo.samples import make_sample_set
            args.input = str(make_sample_set(os.path.join(args.output, "_samples")))
            print(f"no --input given: scoring the sample photographs copied to {args.input}")
        below, gates = cascade_and_gates(args, card)
        graph = score_images(args.input, args.output or "", card, k=args.topk, batch_size=args.batch_size,
                             max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                             intra_op_threads=args.threads, shrink=args.shrink, derived_only=args.derived_only,
                             escalate=args.escalate_card, escalate_below=below, deadline_s=args.deadline,
                             escalation_s=args.escalation_s, gates=gates, **limits(args))
        if args.export:
            from beamzoo.bundle import export
            print(f"bundle written to {export(graph, args.export)}; run it with: "
                  f"beamzoo run {args.export} --input 'GLOB' --output OUT")
            return 0
        edge = EdgeRunner(workers=args.workers, progress=not args.no_progress)
        stats = run(graph, args.runner, beam_args, edge=edge, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        interrupted()
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    first = "" if stats.first_result_s is None else f" (first result after {stats.first_result_s:.1f} s)"
    print(f"{stats.inputs / stats.seconds:.1f} images/s over {stats.seconds:.1f} s{first}; "
          f"results in {args.output}")
    for name, n in sorted(stats.counters.items()):
        print(f"{name.removesuffix('_held')}: held for {n} rows" if name.endswith("_held") else f"{name}: {n} rows")
    if args.save_profile:
        from beamzoo.gates import save_profile
        profile = save_profile(os.path.join(args.output, "predictions"), args.save_profile)
        print(f"label profile of {profile['rows']} predictions saved to {args.save_profile}")
    if stats.stopped:
        print(f"stopped: {stats.stopped}; what was read is written (continue with --resume)", file=sys.stderr)
        return STOPPED
    return 0


STOPPED = 3  # the exit code of a run a gate stopped


def cascade_and_gates(args, card) -> tuple[float, list[dict]]:
    """The escalation threshold (chosen on a calibration sample with --escalate_agreement)
    and the gates' keyword arguments."""
    from beamzoo.gates import load_profile, parse_gate
    below = 0.5 if args.escalate_below is None else args.escalate_below
    if args.escalate_card is not None and args.escalate_agreement is not None:
        from beamzoo.cascade import choose_threshold
        from beamzoo.transforms.io import list_files
        from beamzoo.transforms.sources import Manifest
        paths = (Manifest(args.input).table().column("path").to_pylist()
                 if args.input.lower().endswith((".csv", ".parquet")) else list_files(args.input))
        choice = choose_threshold(card, args.escalate_card, paths, args.escalate_agreement,
                                  n=args.calibration_images, shrink=args.shrink)
        print(choice.line(args.escalate_card.ref, args.escalate_agreement))
        below = choice.threshold
    gates = []
    for spec in args.gate:
        kw = {**parse_gate(spec), "window": args.gate_window, "spec": spec}
        if kw["metric"] == "label_distance":
            if not args.gate_profile:
                raise KnobError(f"--gate {spec!r}: label_distance needs --gate_profile FILE "
                                "(saved by an earlier run with --save_profile FILE)")
            kw["reference"] = load_profile(args.gate_profile)
        gates.append(kw)
    return below, gates


if __name__ == "__main__":
    sys.exit(main())

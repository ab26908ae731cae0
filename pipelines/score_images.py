"""Batch-score a set of images with an ImageNet classifier; results to Parquet.

    python pipelines/score_images.py --input 'photos/**/*.jpg' --output out/
    python pipelines/score_images.py --input ... --output out/ --runner=EdgeRunner
    python pipelines/score_images.py --input ... --output out/ --runner=FlinkRunner --flink_master=[local]
    python pipelines/score_images.py --export bundle/          # the graph and its model, for a device
    python pipelines/score_images.py --export bundle/ --sign keys/release.key   # signed (beamzoo keys new)
    python pipelines/score_images.py --input ... --output out/ --runner=edge --zoo zoo/ --model cat --model_refresh 60
    python pipelines/score_images.py --input ... --output out/ --runner=edge --config tuned.yaml --adapt

Without --input it scores a sample set of real photographs that ship in
scikit-image and scikit-learn. Writes OUT/predictions/*.parquet,
OUT/dead_letter/*.parquet and OUT/report.html (a page of charts of the run).
With --model_refresh S (edge runner) a newer version of --model NAME put in
the zoo answers from the next batch on, once its card verifies and its inputs,
outputs, labels and preprocessing are the running version's; each row's
``model`` says which version answered it. With --config FILE (written by
``beamzoo tune``) the file's knobs are the defaults of these flags, a flag
given here wins; with --adapt the edge runner keeps each step within the
file's latency budgets. Beam options (--direct_num_workers,
--parallelism, ...) go to Beam runners; anything else is refused.
"""
from __future__ import annotations

import logging
import os
import sys

from beamzoo import zoo
from beamzoo.bundle import EXPORT, BundleError, export, private_key
from beamzoo.cascade import CALIBRATION_IMAGES, Cascade, choose_threshold
from beamzoo.classify import COMMAND_KNOBS, Classify
from beamzoo.cli_args import (FLAG_NAMES, Parser, add_config, add_knobs, add_runner, check_leftovers,
                               config_budgets, given, number)
from beamzoo.core.knobs import KnobError, pick
from beamzoo.core.limits import MAX_DEAD_FRACTION, TooManyDeadLetters
from beamzoo.gates import load_profile, save_profile
from beamzoo.pipeline import TOO_MANY_DEAD, interrupted, on_sigterm, run_command, score_images, user_errors
from beamzoo.runners.edge import EdgeRunner
from beamzoo.runners.registry import is_beam
from beamzoo.transforms.resume import RESUME_BY
from beamzoo.transforms.deadline import Deadline
from beamzoo.transforms.gate import ACTIONS, Gate, parse_gate
from beamzoo.transforms.io import list_files
from beamzoo.transforms.sinks import DERIVED_ONLY
from beamzoo.transforms.sources import Manifest

STOPPED = 3  # the exit code of a run a gate stopped
CLASSIFY = COMMAND_KNOBS
FLAGS = FLAG_NAMES
EDGE = pick(EdgeRunner, "workers", "progress", "adapt")
CASCADE = pick(Cascade, "escalation_s", escalate_below="below")


def parser() -> Parser:
    p = Parser(prog=os.path.basename(__file__), description=__doc__)
    p.add_argument("--input", help="glob of image files ('**' recurses; quote it) or a directory; "
                                   "default: a sample set of real photographs")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="folder for the results: OUTPUT/predictions, OUTPUT/dead_letter, "
                                        "OUTPUT/report.html")
    out.add_argument("--export", metavar="DIR", help="write the graph and its model files as a bundle "
                                                     "to DIR instead of running (run it with `beamzoo run`)")
    add_knobs(p, EXPORT)
    add_runner(p)
    add_config(p, "classify", text=("model", "escalate"))
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="NAME or NAME:VERSION from the zoo (default efficientnet_lite0, "
                                       "NAME alone: its newest version), or the path of a card file")
    model.add_argument("--select", metavar="SELECTOR",
                       help="the cheapest model that matches, e.g. 'task=image-classification,imagenet_top1>=0.76'")
    p.add_argument("--zoo", action="append", default=[], metavar="DIR",
                   help="a model repository (<DIR>/<name>/<version>/card.yaml) beside the built-ins; "
                        "also BEAMZOO_ZOO")
    add_knobs(p, CLASSIFY, FLAGS)
    add_knobs(p, EDGE, {"progress": "no_progress"})
    add_knobs(p, {"derived_only": DERIVED_ONLY})
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --output: inputs already done there are skipped")
    add_knobs(p, {"resume_by": RESUME_BY})
    p.add_argument("--profile", metavar="FILE", help="write the run's per-step metrics to FILE (JSON)")
    add_knobs(p, {"max_dead_fraction": MAX_DEAD_FRACTION})
    add_cascade_and_gates(p)
    return p


def add_cascade_and_gates(p) -> None:
    c = p.add_argument_group("cascade", "a fast model on every image, a stronger one where it is unsure")
    c.add_argument("--escalate", metavar="MODEL", help="the stronger model (zoo name or card file)")
    t = c.add_mutually_exclusive_group()
    add_knobs(t, pick(CASCADE, "escalate_below"))
    t.add_argument("--escalate_agreement", type=number(float, 0, 1), metavar="F",
                   help="choose the threshold: the cheapest whose answers agree with the stronger model on "
                        "at least F of a calibration sample of the inputs (printed)")
    add_knobs(c, {"calibration_images": CALIBRATION_IMAGES})
    add_knobs(c, pick(Deadline, deadline="seconds"))
    add_knobs(c, pick(CASCADE, "escalation_s"))
    g = p.add_argument_group("gates", "watch the answers; see the README's section on gates")
    g.add_argument("--gate", action="append", default=[], metavar="SPEC",
                   help="METRIC OP X[:ACTION], e.g. 'mean_confidence<0.3:stop', 'fraction_below(0.2)>0.5:divert', "
                        "'label_distance>0.4:warn', 'bias(group)<0.8:warn'; ACTION one of "
                        f"{', '.join(ACTIONS)} (divert: to OUTPUT/review; stop: exit code 3, edge runner)")
    add_knobs(g, pick(Gate, gate_window="window"))
    g.add_argument("--gate_profile", metavar="FILE", help="the reference label profile of label_distance")
    g.add_argument("--save_profile", metavar="FILE",
                   help="after the run, save the label profile of its predictions to FILE")


def parse(argv: list[str]):
    p = parser()
    args, rest = p.parse_known_args(argv)
    check_leftovers(p, args.runner, rest, "'photos/*.jpg'")
    card = pick_model(p, args)
    args.sign_key = None
    if args.sign is not None:
        if not args.export:
            p.error("--sign signs a bundle: give it with --export DIR")
        try:
            args.sign_key = private_key(args.sign)
        except BundleError as exc:
            p.error(f"--sign: {exc}")
    if (args.escalate_below is not None or args.escalate_agreement is not None) and not args.escalate:
        p.error("--escalate_below and --escalate_agreement need --escalate MODEL")
    args.escalate_card = None
    if args.escalate:
        try:
            args.escalate_card = zoo.get(args.escalate)
        except (zoo.UnknownModel, zoo.CardError, zoo.ModelIntegrityError) as exc:
            p.error(f"--escalate: {exc}")
    if args.topk is not None and args.topk > len(card.labels):
        p.error(f"--topk must be between 1 and {len(card.labels)} (the labels of {card.ref}), got {args.topk}")
    if args.isolate is False and (args.time_limit or args.memory_limit):
        p.error("--no_isolation turns the limits off: give it or --time_limit/--memory_limit, not both")
    if args.model_refresh is not None:
        problem = refresh_problem(args)
        if problem:
            p.error(f"--model_refresh: {problem}")
    return args, rest, card


def refresh_problem(args) -> str | None:
    """Why --model_refresh cannot follow the model of this command line, or None."""
    model = args.model
    if args.select:
        return "it follows a model named without a version (--model NAME); --select picks one card"
    if model and (model.endswith((".yaml", ".yml", ".json")) or "/" in model or os.sep in model):
        return (f"--model {model} is one card file, so there is nothing to move to; put it in a repository and "
                "name it without a version (--zoo DIR --model NAME)")
    if model and ":" in model:
        name, version = model.split(":", 1)
        return f"--model {model} pins version {version}, so there is nothing to move to; name it as --model {name}"
    if args.escalate:
        return "a cascade's models stay the versions it was built with; give --model_refresh or --escalate"
    if args.export:
        return "a bundle runs the models it carries; leave it out with --export"
    if is_beam(args.runner):
        return (f"it needs a runner that keeps the graph in one long-lived process (--runner EdgeRunner); "
                f"{args.runner} runs it through Beam")
    return None


def pick_model(p, args) -> zoo.ModelCard:
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
            card = zoo.get(args.model or Classify.knobs["model"].default)
    except (zoo.UnknownModel, zoo.CardError, zoo.SelectorError, zoo.ModelIntegrityError) as exc:
        p.error(f"--{'select' if args.select else 'model'}: {exc}")
    problem = zoo.classifier_problem(card)
    if problem:
        p.error(f"--{'select' if args.select else 'model'}: {card.ref} {problem}")
    return card


def main(argv=None) -> int:
    args, beam_args, card = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR)
    on_sigterm()
    progress = args.progress is not False
    try:
        if args.export:
            args.input = args.input or "."  # a bundle is given its input when it runs
        elif args.input is None:
            from beamzoo.samples import make_sample_set
            args.input = str(make_sample_set(os.path.join(args.output, "_samples")))
            print(f"no --input given: scoring the sample photographs copied to {args.input}")
        knobs = given(args, CLASSIFY)
        if args.escalate_card is not None:
            knobs.update(cascade(args, card))
        graph = score_images(args.input, args.output or "", card, escalate=args.escalate_card,
                             deadline=args.deadline, gates=gates(args), derived_only=bool(args.derived_only), **knobs)
        if args.export:
            print(f"bundle written to {export(graph, args.export, sign=args.sign_key)}"
                  f"{' and signed' if args.sign_key else ''}; run it with: beamzoo run {args.export} "
                  f"--input 'GLOB' --output OUT{' --trust PUBKEY' if args.sign_key else ''}")
            return 0
        edge = EdgeRunner(**given(args, pick(EDGE, "workers", "adapt")), progress=progress, **config_budgets(args))
        stats = run_command(graph, args, beam_args, edge, progress)
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except TooManyDeadLetters as exc:
        print(f"error: {exc}", file=sys.stderr)
        return TOO_MANY_DEAD
    except (BundleError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    first = "" if stats.first_result_s is None else f" (first result after {stats.first_result_s:.1f} s)"
    print(f"{stats.inputs / stats.seconds:.1f} images/s over {stats.seconds:.1f} s{first}; "
          f"results in {args.output}")
    for name, n in sorted(stats.counters.items()):
        if name.endswith("_held"):
            print(f"{name.removesuffix('_held')}: held for {n} rows")
        else:
            print(f"{name}: {n}" if name == "adapt changes" else f"{name}: {n} rows")
    if args.save_profile:
        profile = save_profile(os.path.join(args.output, "predictions"), args.save_profile)
        print(f"label profile of {profile['rows']} predictions saved to {args.save_profile}")
    if stats.stopped:
        print(f"stopped: {stats.stopped}; what was read is written (continue with --resume)", file=sys.stderr)
        return STOPPED
    return 0


def cascade(args, card) -> dict:
    """The cascade's knobs: the escalation threshold (chosen on a calibration sample with
    --escalate_agreement) and how long an escalation takes."""
    knobs = given(args, CASCADE)
    if "escalate_below" in knobs:
        knobs["below"] = knobs.pop("escalate_below")
    if args.escalate_agreement is not None:
        paths = (Manifest(args.input).table().column("path").to_pylist()
                 if args.input.lower().endswith((".csv", ".parquet")) else list_files(args.input))
        steps = {k: v for k, v in given(args, CLASSIFY).items() if k not in ("topk", "max_bytes")}
        n = given(args, {"calibration_images": CALIBRATION_IMAGES}).get("calibration_images")
        choice = choose_threshold(card, args.escalate_card, paths, args.escalate_agreement,
                                  **({"n": n} if n else {}), **steps)
        print(choice.line(args.escalate_card.ref, args.escalate_agreement))
        knobs["below"] = choice.threshold
    return knobs


def gates(args) -> list[dict]:
    """The gates' keyword arguments."""
    out = []
    for spec in args.gate:
        kw = {**parse_gate(spec), **given(args, pick(Gate, gate_window="window")), "spec": spec}
        if "gate_window" in kw:
            kw["window"] = kw.pop("gate_window")
        if kw["metric"] == "label_distance":
            if not args.gate_profile:
                raise KnobError(f"--gate {spec!r}: label_distance needs --gate_profile FILE "
                                "(saved by an earlier run with --save_profile FILE)")
            kw["reference"] = load_profile(args.gate_profile)
        out.append(kw)
    return out


if __name__ == "__main__":
    sys.exit(main())

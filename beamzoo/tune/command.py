"""``beamzoo tune``: its options and what it does (beamzoo.cli holds only the subparser).

    beamzoo tune --input 'photos/*.jpg' --target 'throughput>=80' --target 'agreement>=0.97' --config tuned.yaml
    beamzoo tune --input 'photos/*.jpg' --serve --rate 40 --target 'latency_p95<=0.25' --config served.yaml
    beamzoo tune --ocr --input 'scans/*.png' --target 'throughput>=2' --config ocr.yaml
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import tempfile

from beamzoo.cli_args import add_knobs, fail, number
from beamzoo.core.knobs import pick
from beamzoo.transforms.escalate import Escalate
from beamzoo.tune.job import SAMPLE
from beamzoo.tune.result import METRICS, TargetError, TuneResult, parse_target

DESCRIPTION = """\
Find the cheapest configuration of a graph that meets the targets, and write it as a config
that score_images.py, ocr_images.py and beamzoo serve read (--config FILE).

The graph is the one score_images.py builds from the same flags (--model or --select, --escalate),
ocr_images.py's with --ocr, or a bundle's (--bundle DIR). The knobs tried are those the graph's
steps, the edge runner (and with --serve, the server) declare values to try for, plus the zoo's
models with the task and labels of --model (fp32 and int8, Lite0/1/2) and cascades of them.
Each step's cost is measured per model and per knob value on a sample of --input (a few
whole-graph runs, not one per combination), the costs are composed into a prediction for every
configuration, and the cheapest predicted to meet every target is run on the sample to verify it.

Targets (repeat --target): throughput>=R (inputs/s on this machine), latency_p95<=T (seconds per
input, read to written; with --serve, request to answer at --rate R), finish<=T (seconds for the
whole --input), agreement>=F (top-1 agreement with --reference). The cost is CPU-core seconds per
input, or with --costs FILE a price per input ({cpu: PER_CORE_HOUR, gpu: PER_GPU_HOUR,
tiers: {TIER: PER_CORE_HOUR}}, by each step's placement).

Exit codes: 0 chosen (and written); 2 a mistake, or a target that cannot be met (one line naming
it and the best measured; nothing written).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("the graph", "as score_images.py takes it (or ocr_images.py's with --ocr, or a bundle's)")
    g.add_argument("--input", metavar="GLOB", help="glob of image files ('**' recurses; quote it), a folder or a "
                                                   "manifest; default: the sample photographs")
    model = g.add_mutually_exclusive_group()
    model.add_argument("--model", help="NAME or NAME:VERSION from the zoo, or a card file (default "
                                       "efficientnet_lite0); its task and labels choose the variants tried")
    model.add_argument("--select", metavar="SELECTOR", help="the cheapest model that matches, e.g. "
                                                            "'task=image-classification,imagenet_top1>=0.76'")
    g.add_argument("--zoo", action="append", default=[], metavar="DIR",
                   help="a model repository (<DIR>/<name>/<version>/card.yaml) beside the built-ins")
    g.add_argument("--escalate", metavar="MODEL", help="start from a cascade with this stronger model")
    add_knobs(g, pick(Escalate, escalate_below="below"))
    g.add_argument("--ocr", action="store_true", help="tune ocr_images.py's graph (PP-OCRv4)")
    g.add_argument("--bundle", metavar="DIR", help="tune an exported bundle (its runner's and server's knobs only)")
    g.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                   help="with --bundle: run it only if signed by this public key")
    t = p.add_argument_group("tuning")
    add_knobs(t, {"sample": SAMPLE})
    t.add_argument("--target", action="append", default=[], metavar="SPEC",
                   help="e.g. 'throughput>=80', 'latency_p95<=0.25', 'finish<=3600', 'agreement>=0.97'; repeat")
    t.add_argument("--reference", metavar="NAME", help="the model agreement is counted against (default: the "
                                                       "strongest variant by its card's imagenet_top1)")
    t.add_argument("--costs", metavar="FILE", help="prices per hour by placement (YAML: cpu, gpu, tiers); "
                                                   "default: the cost is CPU-core seconds per input")
    t.add_argument("--serve", action="store_true", help="tune beamzoo serve (its batching and workers) for "
                                                        "requests arriving at --rate")
    t.add_argument("--rate", type=number(float, 1e-6), metavar="R", help="with --serve: requests per second")
    t.add_argument("--config", metavar="OUT.yaml", help="write the chosen configuration here")
    t.add_argument("--report", metavar="DIR", help="write a Markdown summary and plots to DIR")


class TuneError(ValueError):
    """A combination of options that does not make sense."""


def _check(args) -> None:
    if args.serve != (args.rate is not None):
        raise TuneError("--serve and --rate R go together: the latency of beamzoo serve at R requests/s")
    shaped = [f for f, v in (("--model", args.model), ("--select", args.select), ("--escalate", args.escalate))
              if v is not None]
    if args.bundle and (shaped or args.ocr):
        raise TuneError(f"--bundle runs the graph it carries: leave out {(shaped or ['--ocr'])[0]}")
    if args.ocr and shaped:
        raise TuneError(f"--ocr tunes the OCR graph: leave out {shaped[0]}")
    if args.ocr and args.serve:
        raise TuneError("beamzoo serve does not serve the OCR graph: leave out --serve with --ocr")
    if args.escalate_below is not None and not args.escalate:
        raise TuneError("--escalate_below needs --escalate MODEL")
    if args.trust and not args.bundle:
        raise TuneError("--trust checks bundles: give it with --bundle DIR")
    if args.reference and (args.ocr or args.bundle):
        raise TuneError("--reference names a model to agree with: it needs the classify graph (--model)")


def _card(what: str, ref: str):
    from beamzoo import zoo
    try:
        card = zoo.get(ref)
    except (zoo.UnknownModel, zoo.CardError, zoo.ModelIntegrityError) as exc:
        raise TuneError(f"{what}: {exc}") from None
    problem = zoo.classifier_problem(card)
    if problem:
        raise TuneError(f"{what}: {card.ref} {problem}")
    return card


def graph_of(args):
    """The graph maker of the command line (as score_images.py's pick_model chooses its model)."""
    from beamzoo import zoo
    from beamzoo.cascade import label_problem
    from beamzoo.classify import DEFAULT_MODEL
    from beamzoo.tune.graphs import BundleGraph, ClassifyGraph, OcrGraph
    if args.bundle:
        from beamzoo.bundle import public_key
        return BundleGraph(args.bundle, tuple(public_key(k) for k in args.trust))
    if args.ocr:
        return OcrGraph()
    for d in args.zoo:
        zoo.add_repository(d)
    if args.select:
        try:
            matches = zoo.select(**zoo.parse_selector(args.select))
        except zoo.SelectorError as exc:
            raise TuneError(f"--select: {exc}") from None
        card = _card("--select", matches[0].ref)
        print(f"--select picked {card.ref}, the cheapest of {len(matches)} matching")
    else:
        card = _card("--model", args.model or DEFAULT_MODEL)
    strong = _card("--escalate", args.escalate) if args.escalate else None
    g = ClassifyGraph(card, strong, args.escalate_below)
    if args.reference:
        ref = _card("--reference", args.reference)
        problem = label_problem(card, ref)
        if problem:
            raise TuneError(f"--reference {ref.ref} cannot be agreed with: {problem}")
        g.cards[ref.ref] = ref
        args.reference = ref.ref
    return g


def job_from(args: argparse.Namespace, workdir: str, say=print):
    """The ``Job`` of a parsed command line (its sample linked below ``workdir``)."""
    from beamzoo.tune.job import Job
    from beamzoo.tune.predict import read_costs
    _check(args)
    targets = [parse_target(t) for t in args.target]
    costs = read_costs(args.costs) if args.costs else None
    graph = graph_of(args)
    pattern = args.input
    if pattern is None:
        from beamzoo.samples import make_sample_set
        pattern = str(make_sample_set(os.path.join(workdir, "photos")))
        say(f"no --input given: tuning on the sample photographs ({pattern})")
    return Job.make(graph, pattern, args.sample or SAMPLE.default, targets, workdir=os.path.join(workdir, "job"),
                    costs=costs, serve=args.serve, rate=args.rate, reference=args.reference, say=say)


def job_of(argv: list[str], say=print):
    """The ``Job`` of a ``beamzoo tune`` command line (what bench/tune.py measures with); remove
    its ``workdir`` when done. Mistakes raise ``ValueError`` (one line) or exit as argparse does."""
    from beamzoo.cli_args import Parser
    p = Parser(prog="beamzoo tune")
    add_arguments(p)
    return job_from(p.parse_args(argv), tempfile.mkdtemp(prefix="beamzoo-tune-"), say)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from beamzoo.bundle import BundleError
    from beamzoo.pipeline import interrupted, user_errors
    from beamzoo.tune.predict import CostsError
    from beamzoo.tune.search import tune
    workdir = tempfile.mkdtemp(prefix="beamzoo-tune-")
    try:
        report = _report_writer() if args.report else None
        job = job_from(args, workdir)
        result = tune(job)
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except (TuneError, TargetError, CostsError, BundleError, *user_errors()) as exc:
        return fail(str(exc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if result.infeasible:
        return fail(result.infeasible)
    print(table(result))
    if not job.serve and job.total > result.sample:
        print(f"(latency_p95 is predicted for a run of all {job.total} inputs, whose queues fill; "
              f"the sample's run held fewer)")
    if args.config:
        write_config(args.config, config_of(result, job, argv))
        print(f"config written to {args.config}")
    if report is not None:
        files = report(args.report, result)
        print(f"report written to {args.report} ({len(files)} files)")
    return 0


def _report_writer():
    try:
        from beamzoo.tune.report import write_report
    except ImportError:
        raise TuneError("--report: this beamzoo has no report writer (beamzoo.tune.report); leave --report out") \
            from None
    return write_report


def table(result: TuneResult) -> str:
    """The choice, predicted against measured."""
    from beamzoo.tune.search import show_config
    p = result.chosen
    unit = "CPU-core s" if result.objective == "core_s" else "price"
    rows = [f"chosen: {show_config(p.config)}", f"{'':<12} {'predicted':>11} {'measured':>11}"]
    for metric, shown in (("throughput", "inputs/s"), ("latency_p95", "s"), ("agreement", ""),
                          ("cost", f"{unit} per input")):
        rows.append(f"{metric:<12} {_num(p.predicted.get(metric)):>11} {_num((p.measured or {}).get(metric)):>11}"
                    f"  {shown}")
    runs = sum(q.measured is not None for q in result.points)
    rows.append(f"{len(result.points)} configurations predicted; measured on {result.sample} inputs in "
                f"{result.measuring_s:.1f} s ({runs} of them run)")
    return "\n".join(rows)


def _num(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"


def config_of(result: TuneResult, job, argv: list[str] | None) -> dict:
    """The config file's fields for the choice."""
    config = dict(result.chosen.config)
    serve = None
    if job.serve:
        from beamzoo.tune.space import server_dims
        names = {d.flag for d in server_dims(job.cores)}
        serve = {k: config.pop(k) for k in list(config) if k in names}
    keep = tuple(METRICS) + ("cost",)
    budgets = {k: v for k, v in result.budgets.items() if 0 < v < math.inf}  # a step too quick to time has none
    return {"graph": job.graph.kind, "knobs": config, "serve": serve, "budgets": budgets,
            "targets": [t.text for t in result.targets],
            "predicted": {k: _round(v) for k, v in result.chosen.predicted.items() if k in keep},
            "measured": {k: _round(v) for k, v in (result.chosen.measured or {}).items() if k in keep},
            "command": "beamzoo tune " + shlex.join(argv if argv is not None else sys.argv[2:])}


def _round(v):
    if isinstance(v, float):
        return float(f"{v:.4g}") if math.isfinite(v) else None
    return v


def write_config(path: str, fields: dict) -> None:
    """Through ``beamzoo.tune.config`` (its format); where this beamzoo lacks it, as YAML of the same keys."""
    try:
        from beamzoo.tune import config as cfg
    except ImportError:
        cfg = None
    if cfg is not None:
        cfg.write(path, cfg.Config(**fields))
        return
    import yaml
    body = {"beamzoo": "tuned config 1", **{k: v for k, v in fields.items() if k != "command" and v is not None}}
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# written by: {fields['command']}\n")
        yaml.safe_dump(body, f, sort_keys=False)


__all__ = ["add_arguments", "config_of", "graph_of", "job_from", "job_of", "main", "table", "write_config"]

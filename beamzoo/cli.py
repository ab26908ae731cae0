"""The ``beamzoo`` command.

    beamzoo run DIR --input GLOB --output OUT [--resume] [--derived_only] [--workers N] [--no_progress]
    beamzoo models {list,show,verify} [--zoo DIR] [--json]
    beamzoo flink {fetch,up,down,status} [options]
    beamzoo serve --model NAME[:V] ... [--bundle DIR ...] [--host H] [--port 8501] [batching options]

``run`` runs a bundle (``beamzoo.bundle.export``) on the edge runner, no Beam
needed; its lock is checked before any input is read.
(To score images with a zoo model: python pipelines/score_images.py --help.)
"""
from __future__ import annotations

import argparse
import sys


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (threads for each row-parallel stage), got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beamzoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,models,serve,flink}")
    run = sub.add_parser("run", help="run an exported bundle on this machine (edge runner, no Beam)",
                         description="Run an exported bundle (beamzoo.bundle.export) on the edge runner. "
                                     "The bundle's lock is checked before any input is read.")
    run.add_argument("bundle", metavar="DIR", help="the bundle folder (graph.json, models/, bundle.lock)")
    run.add_argument("--input", required=True, metavar="GLOB",
                     help="glob of input files ('**' recurses) or a directory; quote it")
    run.add_argument("--output", required=True, metavar="OUT", help="folder for the results")
    run.add_argument("--resume", action="store_true",
                     help="continue a run in --output: inputs already done there are skipped")
    run.add_argument("--derived_only", action="store_true",
                     help="write no raw bytes, images or tensors, only what was derived from them")
    run.add_argument("--workers", type=_workers, default=None, metavar="N",
                     help="threads for each row-parallel stage (default: the CPU count)")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    from beamzoo.zoo.commands import add_parser as models
    models(sub)
    sub.add_parser("flink", add_help=False, help="fetch, start, stop or show a local Flink cluster "
                                                 "(beamzoo flink --help)")
    from beamzoo.serve.command import add_arguments
    add_arguments(sub.add_parser("serve", allow_abbrev=False, help="serve zoo models and bundles over HTTP "
                                 "(TF Serving REST, KServe v2, /metrics)"))
    return p


def _run(args) -> int:
    from beamzoo.bundle import BundleError, load
    from beamzoo.pipeline import interrupted, run, user_errors
    from beamzoo.runners.edge import EdgeRunner
    try:
        graph = load(args.bundle, args.input, args.output, derived_only=args.derived_only)
        stats = run(graph, "EdgeRunner", edge=EdgeRunner(workers=args.workers, progress=not args.no_progress),
                    resume=args.resume)
    except KeyboardInterrupt:
        interrupted()
    except (BundleError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "flink":
        from beamzoo.runners.flink import main as flink
        return flink(argv[1:])
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "models":
        from beamzoo.zoo.commands import main as models
        return models(args)
    if args.command == "serve":
        from beamzoo.serve.command import main as serve
        return serve(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())

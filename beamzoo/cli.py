"""The ``beamzoo`` command.

    beamzoo run DIR --input GLOB --output OUT [--trust PUBKEY] [--resume] [--derived_only] [--workers N] [--no_progress]
    beamzoo keys new DIR_OR_PREFIX
    beamzoo models {list,show,verify} [--zoo DIR] [--json]
    beamzoo flink {fetch,up,down,status} [options]
    beamzoo serve --model NAME[:V] ... [--bundle DIR ...] [--host H] [--port 8501] [batching options]
    beamzoo tune --input GLOB --target SPEC ... [--serve --rate R] [--config OUT.yaml] [--report DIR]

``run`` runs a bundle (``beamzoo.bundle.export``) on the edge runner, no Beam
needed; its lock (and with ``--trust``, its signature) is checked before any
input is read. ``keys new`` makes the key pair that signs bundles (``--export DIR --sign KEY``).
(To score images with a zoo model: python pipelines/score_images.py --help.)
"""
from __future__ import annotations

import argparse
import os
import sys


def parser() -> argparse.ArgumentParser:
    from beamzoo.cli_args import Parser, add_knobs
    from beamzoo.core.knobs import pick
    from beamzoo.runners.edge import EdgeRunner
    from beamzoo.transforms.sinks import DERIVED_ONLY
    p = Parser(prog="beamzoo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,keys,models,serve,tune,flink}")
    run = sub.add_parser("run", help="run an exported bundle on this machine (edge runner, no Beam)",
                         description="Run an exported bundle (beamzoo.bundle.export) on the edge runner. "
                                     "The bundle's lock, and with --trust its signature, is checked before "
                                     "any input is read.")
    run.add_argument("bundle", metavar="DIR", help="the bundle folder (graph.json, models/, bundle.lock)")
    run.add_argument("--input", required=True, metavar="GLOB",
                     help="glob of input files ('**' recurses) or a directory; quote it")
    run.add_argument("--output", required=True, metavar="OUT", help="folder for the results")
    run.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                     help="run the bundle only if it is signed by this Ed25519 public key (PREFIX.pub of "
                          "`beamzoo keys new`), with nothing changed since; repeat to trust several keys")
    run.add_argument("--resume", action="store_true",
                     help="continue a run in --output: inputs already done there are skipped")
    add_knobs(run, {"derived_only": DERIVED_ONLY})
    add_knobs(run, pick(EdgeRunner, "workers", "progress"), {"progress": "no_progress"})
    keys = sub.add_parser("keys", help="make the key pair that signs bundles",
                          description="Keys that sign bundles: `--export DIR --sign PREFIX.key` signs a bundle, "
                                      "`beamzoo run DIR --trust PREFIX.pub` runs it only as signed.")
    new = keys.add_subparsers(dest="keys_command", required=True, metavar="{new}").add_parser(
        "new", help="write a new Ed25519 key pair",
        description="Write a new Ed25519 key pair: PREFIX.key, the private key (PKCS#8 PEM, unencrypted, "
                    "mode 0600; keep it secret) and PREFIX.pub, the public key (SubjectPublicKeyInfo PEM) "
                    "that devices trust. Existing files are never overwritten.")
    new.add_argument("prefix", metavar="DIR_OR_PREFIX",
                     help="where the keys go: PREFIX.key and PREFIX.pub, or DIR/bundle.key and DIR/bundle.pub "
                          "for a folder (one that exists, or a name ending in /)")
    from beamzoo.zoo.commands import add_parser as models
    models(sub)
    sub.add_parser("flink", add_help=False, help="fetch, start, stop or show a local Flink cluster "
                                                 "(beamzoo flink --help)")
    from beamzoo.serve.command import add_arguments
    add_arguments(sub.add_parser("serve", allow_abbrev=False, help="serve zoo models and bundles over HTTP "
                                 "(TF Serving REST, KServe v2, /metrics)"))
    from beamzoo.tune.command import add_arguments as tune_arguments
    tune_arguments(sub.add_parser("tune", allow_abbrev=False, help="find the cheapest configuration that meets "
                                  "throughput, latency or agreement targets, and write it as a config"))
    return p


def _keys(args) -> int:
    from beamzoo.bundle import BundleError, key_id, new_keys, public_key
    try:
        private, public = new_keys(args.prefix)
    except (BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"private key written to {private} (keep it secret; sign with --export DIR --sign {private})")
    print(f"public key {key_id(public_key(public))[:16]} written to {public} "
          f"(run with: beamzoo run DIR --trust {public} ...)")
    return 0


def _trusted(path):
    """The public key of a --trust file; a mistake names the option."""
    from beamzoo.bundle import BundleError, public_key
    try:
        return public_key(path)
    except BundleError as exc:
        raise BundleError(f"--trust: {exc}") from None


def _run(args) -> int:
    from beamzoo.bundle import BundleError, load
    from beamzoo.cli_args import given
    from beamzoo.core.knobs import pick
    from beamzoo.pipeline import interrupted, on_sigterm, run, user_errors
    from beamzoo.runners.edge import EdgeRunner
    on_sigterm()
    try:
        trust = [_trusted(k) for k in args.trust]
        graph = load(args.bundle, args.input, args.output, derived_only=bool(args.derived_only), trust=trust)
        stats = run(graph, "EdgeRunner", edge=EdgeRunner(**given(args, pick(EdgeRunner, "workers", "progress"))),
                    resume=args.resume)
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except (BundleError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    return 0


def main(argv=None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:  # `beamzoo models list | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "flink":
        from beamzoo.cli_args import Parser
        from beamzoo.runners.flink import main as flink
        try:
            return flink(argv[1:], parser_class=Parser)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
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
    if args.command == "tune":
        from beamzoo.tune.command import main as tune
        return tune(args, argv[1:])
    if args.command == "keys":
        return _keys(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())

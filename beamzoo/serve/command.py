"""``beamzoo serve``: its options and what it does (beamzoo.cli holds only the subparser)."""
from __future__ import annotations

import argparse
import sys

from beamzoo.bundle import BundleError
from beamzoo.classify import Classify
from beamzoo.cli_args import add_knobs, given, number
from beamzoo.core.knobs import pick
from beamzoo.pipeline import user_errors
from beamzoo.serve.knobs import SERVER_KNOBS

MODEL_KNOBS = pick(Classify, "topk", "max_pixels")  # of the zoo models served


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME[:V]",
                   help="a zoo model to serve (name, name:version or a card file); repeat for more")
    p.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="an exported bundle to serve, under its model's name and version; repeat for more")
    p.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                   help="serve bundles only if signed by this Ed25519 public key (beamzoo keys new), with "
                        "nothing changed since; repeat to trust several keys")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8501,
                   help="port (default 8501; 0 picks a free one)")
    add_knobs(p, SERVER_KNOBS)
    add_knobs(p, MODEL_KNOBS)
    p.add_argument("--redis", default=None, metavar="URL",
                   help="also take requests from a Redis stream (redis://HOST:PORT/DB)")
    p.add_argument("--stream", default="beamzoo", metavar="NAME", help="the Redis stream (default beamzoo)")
    p.add_argument("--consumer", default=None, metavar="NAME",
                   help="this server's name in the stream's consumer group; started again under the same "
                        "name it first answers what it had taken (default: host-pid)")


def _trusted(path):
    from beamzoo.bundle import public_key
    try:
        return public_key(path)
    except BundleError as exc:
        raise BundleError(f"--trust: {exc}") from None


def main(args: argparse.Namespace) -> int:
    from beamzoo.serve.models import Servable  # the server's packages: needed to serve, not to parse
    from beamzoo.serve.server import Server
    try:
        if not args.model and not args.bundle:
            raise ValueError("nothing to serve: give --model NAME[:V] or --bundle DIR")
        knobs = given(args, SERVER_KNOBS)
        max_batch = knobs.get("max_batch", SERVER_KNOBS["max_batch"].default)  # what inference runs at once
        servables = [Servable.from_model(m, max_batch, **given(args, MODEL_KNOBS))
                     for m in args.model]
        if args.trust and not args.bundle:
            raise ValueError("--trust checks bundles: give it with --bundle DIR")
        trust = [_trusted(k) for k in args.trust]
        servables += [Servable.from_bundle(b, trust) for b in args.bundle]
        server = Server(servables, **knobs)
    except (BundleError, ValueError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.redis:
        try:
            server.consume(args.redis, args.stream, args.consumer)
        except Exception as exc:  # noqa: BLE001 - the URL or the server: the user's to fix
            server.close()
            print(f"error: cannot use the Redis stream {args.stream!r} at {args.redis}: {exc}", file=sys.stderr)
            return 2
    try:
        server.run(args.host, args.port)
    except OSError as exc:
        server.close()
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0

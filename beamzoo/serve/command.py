"""``beamzoo serve``: its options and what it does (beamzoo.cli holds only the subparser)."""
from __future__ import annotations

import argparse
import sys


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not v >= (0 if kind is float else 1):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if kind is float else '>= 1'}, got {text!r}")
        return v
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME[:V]",
                   help="a zoo model to serve (name, name:version or a card file); repeat for more")
    p.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="an exported bundle to serve, under its model's name and version; repeat for more")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501; 0 picks a free one)")
    p.add_argument("--max_batch", type=_positive(int), default=8, metavar="N",
                   help="most rows run through the graph at once (default 8)")
    p.add_argument("--max_delay_ms", type=_positive(float), default=5.0, metavar="MS",
                   help="longest a row waits for others to fill its batch (default 5)")
    p.add_argument("--max_queue", type=_positive(int), default=256, metavar="N",
                   help="rows waiting at most; beyond, requests get 429 at once (default 256)")
    p.add_argument("--max_body_bytes", type=_positive(int), default=32 << 20, metavar="B",
                   help="largest request body (default 32 MiB); larger ones get 413")
    p.add_argument("--max_pixels", type=_positive(int), default=100_000_000, metavar="N",
                   help="refuse images with more pixels, from their header (default 100000000)")
    p.add_argument("--workers", type=_positive(int), default=None, metavar="N",
                   help="threads running batches (default: the CPU count)")
    p.add_argument("--timeout_s", type=_positive(float), default=60.0, metavar="S",
                   help="a request not answered by then gets 504 (default 60)")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="also take requests from a Redis stream (redis://HOST:PORT/DB)")
    p.add_argument("--stream", default="beamzoo", metavar="NAME", help="the Redis stream (default beamzoo)")
    p.add_argument("--consumer", default=None, metavar="NAME",
                   help="this server's name in the stream's consumer group; started again under the same "
                        "name it first answers what it had taken (default: host-pid)")
    p.add_argument("--topk", type=_positive(int), default=None, metavar="K",
                   help="labels per prediction (default 5)")


def main(args: argparse.Namespace) -> int:
    from beamzoo.bundle import BundleError
    from beamzoo.pipeline import user_errors
    from beamzoo.serve.models import Servable
    from beamzoo.serve.server import Server
    try:
        if not args.model and not args.bundle:
            raise ValueError("nothing to serve: give --model NAME[:V] or --bundle DIR")
        servables = [Servable.from_model(m, args.max_batch, args.topk, args.max_pixels) for m in args.model]
        servables += [Servable.from_bundle(b) for b in args.bundle]
        server = Server(servables, args.max_batch, args.max_delay_ms, args.max_queue, args.max_body_bytes,
                        args.workers, args.timeout_s)
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

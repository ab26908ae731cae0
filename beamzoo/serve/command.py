"""``beamzoo serve``: its options and what it does (beamzoo.cli holds only the subparser).

With ``--config FILE`` (a tuned config of the classify graph, ``beamzoo tune --serve``) the
file's ``serve`` section gives the batching flags' defaults, its ``knobs`` the model served
when no --model or --bundle is given and that model's knobs (threads, shrink, topk, ...);
a flag given on the command line wins."""
from __future__ import annotations

import argparse
import os
import sys

from beamzoo.bundle import BundleError
from beamzoo.classify import Classify
from beamzoo.cli_args import FLAG_NAMES, add_config, add_knobs, config_budgets, config_value, given, number
from beamzoo.core.knobs import pick
from beamzoo.pipeline import user_errors
from beamzoo.serve.knobs import SERVER_KNOBS
from beamzoo.serve.repository import REPOSITORY_KNOBS, versions_in
from beamzoo.tune.config import Config, ConfigError
from beamzoo.zoo import add_repository

MODEL_KNOBS = pick(Classify, "topk", "max_pixels")  # of the zoo models served
BATCH_RUN = ("batch_size", "workers")  # a config's knobs for the batch run; its serve section has the server's
NOT_SERVED = ("model", "prefix", "model_refresh")  # Classify's knobs a config cannot set for a served model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME[:V]",
                   help="a zoo model to serve (name, name:version or a card file); repeat for more. With --zoo, "
                        "a NAME the repository has is served from it, every version, following it; the others "
                        "come from the zoo, as without --zoo")
    p.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="an exported bundle to serve, under its model's name and version; repeat for more")
    p.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                   help="serve bundles only if signed by this Ed25519 public key (beamzoo keys new), with "
                        "nothing changed since; repeat to trust several keys")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8501,
                   help="port (default 8501; 0 picks a free one)")
    p.add_argument("--grpc_port", type=number(int, 0, 65535), default=None, metavar="PORT",
                   help="also serve KServe v2 over gRPC on this port, with the same batching, limits and metrics "
                        "(0 picks a free one; default: HTTP only)")
    p.add_argument("--zoo", default=None, metavar="DIR",
                   help="a model repository (DIR/NAME/VERSION/card.yaml) to serve while it changes: every version "
                        "of its models (with --model, of those named); an added version goes live (the name alone "
                        "moves to the newest), a removed one is retired once its requests are answered, one whose "
                        "card does not verify is refused. POST /v2/repository/index lists it; "
                        "/v2/repository/models/NAME/load and /unload change it on request")
    add_knobs(p, REPOSITORY_KNOBS)
    add_knobs(p, SERVER_KNOBS, skip=("budgets",))  # the budgets come from --config
    add_config(p, "classify", sections=_from_config)
    add_knobs(p, MODEL_KNOBS)
    p.add_argument("--redis", default=None, metavar="URL",
                   help="also take requests from a Redis stream (redis://HOST:PORT/DB)")
    p.add_argument("--stream", default="beamzoo", metavar="NAME", help="the Redis stream (default beamzoo)")
    p.add_argument("--consumer", default=None, metavar="NAME",
                   help="this server's name in the stream's consumer group; started again under the same "
                        "name it first answers what it had taken (default: host-pid)")


def _from_config(config: Config, where: str) -> dict:
    """The flags a tuned config sets: its serve section, and topk/max_pixels of its knobs
    (the rest of them are checked here, and become the served models' knobs in ``main``)."""
    served_knobs(config, where)
    return {"serve": config.serve or {}, "knobs": {k: v for k, v in config.knobs.items() if k in MODEL_KNOBS}}


def served_knobs(config: Config, where: str = "--config") -> dict:
    """The knobs of the served models' graph that a tuned config sets (Classify's: threads,
    shrink, ...), checked; a cascade, which one served model cannot answer, is refused."""
    flags = {FLAG_NAMES.get(n, n): n for n in Classify.knobs if n not in NOT_SERVED and n not in MODEL_KNOBS}
    out = {}
    for flag, value in config.knobs.items():
        if flag in ("escalate", "escalate_below"):
            raise ConfigError(f"{where}: knobs: {flag}: the config is a cascade, and beamzoo serve serves single "
                              "models; serve one with --model NAME, or tune with --serve and without --escalate")
        if flag == "model":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: knobs: model must be text (NAME[:VERSION] or a card file), got {value!r}")
            continue
        if flag in BATCH_RUN or flag in MODEL_KNOBS:
            continue
        name = flags.get(flag) or (flag if flag in flags.values() else None)
        if name is None:
            known = ["model", *BATCH_RUN, *MODEL_KNOBS, *flags]
            raise ConfigError(f"{where}: knobs: {flag!r} is not a knob of the classify graph beamzoo serve runs; "
                              f"its knobs: {', '.join(known)}")
        knob = Classify.knobs[name]
        turns = (not knob.default) if knob.type is bool and flag != name else None
        v = config_value(f"{where}: knobs", flag, value, knob, turns)
        if v is not None:
            out[name] = v
    return out


def _trusted(path):
    from beamzoo.bundle import public_key
    try:
        return public_key(path)
    except BundleError as exc:
        raise BundleError(f"--trust: {exc}") from None


def main(args: argparse.Namespace) -> int:
    # gRPC's core logs a failed bind itself before beamzoo's one-line error says it; a user's setting wins
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from beamzoo.serve.models import Servable  # the server's packages: needed to serve, not to parse
    from beamzoo.serve.server import Server
    try:
        config = args.config
        if config is not None and not args.model and not args.bundle and config.knobs.get("model"):
            args.model = [config.knobs["model"]]  # the tuned model, unless the command line names others
        if not args.model and not args.bundle and not args.zoo:
            raise ValueError("nothing to serve: give --model NAME[:V], --bundle DIR or --zoo DIR")
        if args.poll_s is not None and not args.zoo:
            raise ValueError("--poll_s says how often to look at a model repository: give it with --zoo DIR")
        knobs = given(args, SERVER_KNOBS)
        if "budgets" in Server.knobs:
            knobs.update(config_budgets(args))  # what --adapt keeps each step to
        model_knobs = {**(served_knobs(config) if config is not None else {}), **given(args, MODEL_KNOBS)}
        max_batch = knobs.get("max_batch", SERVER_KNOBS["max_batch"].default)  # what inference runs at once
        fixed, followed = list(args.model), []
        if args.zoo:
            if not os.path.isdir(args.zoo):
                raise ValueError(f"--zoo {args.zoo}: no such folder; a model repository is a folder of "
                                 "NAME/VERSION/card.yaml")
            add_repository(args.zoo)  # --model NAME:V and NAME of the repository resolve there too
            names = {n for n, _ in versions_in(args.zoo)}
            followed = [m for m in args.model if m in names]
            fixed = [m for m in args.model if m not in names]
        servables = [Servable.from_model(m, max_batch, **model_knobs) for m in fixed]
        if args.trust and not args.bundle:
            raise ValueError("--trust checks bundles: give it with --bundle DIR")
        trust = [_trusted(k) for k in args.trust]
        servables += [Servable.from_bundle(b, trust) for b in args.bundle]
        server = Server(servables, **knobs)
    except (BundleError, ValueError, OSError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.zoo:
        try:
            server.watch(args.zoo, only=followed if args.model else None, model_knobs=model_knobs,
                         **given(args, REPOSITORY_KNOBS))
            unserved = [m for m in followed if m not in {s.name for s in server.catalog}]
            if unserved:
                raise ValueError(f"--model {unserved[0]}: no version of it in the repository {args.zoo} could be "
                                 "served (the lines above say why)")
        except (ValueError, OSError, *user_errors()) as exc:
            server.close()
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
        server.run(args.host, args.port, grpc_port=args.grpc_port)
    except OSError as exc:
        server.close()
        why = f"cannot listen on {args.host}:{args.port}: {exc.strerror}" if exc.strerror else str(exc)
        print(f"error: {why}", file=sys.stderr)
        return 2
    return 0

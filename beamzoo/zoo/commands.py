"""``beamzoo models list|show|verify``: what the zoo holds, and whether its files are what the cards pin."""
from __future__ import annotations

import json
import os
import sys

from beamzoo.zoo.card import CardError, ModelCard, ModelIntegrityError
from beamzoo.zoo.repository import UnknownModel, add_repository, all_cards, get
from beamzoo.zoo.verify import check_loadable, model_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list, show or verify the models of the zoo",
                       description="The zoo's models: the built-in ones and those of --zoo / BEAMZOO_ZOO "
                                   "repositories (<repo>/<name>/<version>/card.yaml).")
    cmds = p.add_subparsers(dest="models_command", required=True, metavar="{list,show,verify}")
    for name, text in (("list", "one line per model version"), ("show", "one model's whole card"),
                       ("verify", "re-hash every model file there is against its card and have onnxruntime load it; "
                                 "exit 1 on a mismatch")):
        c = cmds.add_parser(name, help=text, description=text)
        if name == "show":
            c.add_argument("model", metavar="NAME[:VERSION]", help="a model, or the path of a card file")
        if name != "verify":
            c.add_argument("--json", action="store_true", help="JSON instead of text")
        if name == "verify":
            c.add_argument("--build", action="store_true", help="build built-in models not built yet, then check them")
        c.add_argument("--zoo", action="append", default=[], metavar="DIR", help="a model repository to add")


def main(args) -> int:
    try:
        for d in args.zoo:
            add_repository(d)
        return {"list": _list, "show": _show, "verify": _verify}[args.models_command](args)
    except (CardError, ModelIntegrityError, UnknownModel) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _row(card: ModelCard) -> dict:
    return {"model": card.ref, "task": card.task, "tags": list(card.tags),
            "metrics": {k: m["value"] for k, m in card.metrics.items()},
            "built": os.path.exists(card.file), "card": card.card_path}


def _list(args) -> int:
    cards = all_cards(verify=False)
    if args.json:
        print(json.dumps([_row(c) for c in cards], indent=1))
        return 0
    rows = [(c.ref, c.task, ",".join(c.tags), "  ".join(f"{k}={m['value']:g}" for k, m in sorted(c.metrics.items())))
            for c in cards]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[3])
    return 0


def _show(args) -> int:
    card = get(args.model)
    d = {**card.as_dict(), "labels": (f"{len(card.labels)} labels: {', '.join(card.labels[:5])}"
                                      + (", ..." if len(card.labels) > 5 else ""))}
    if args.json:
        print(json.dumps({**card.as_dict(), "built": os.path.exists(card.file)}, indent=1))
        return 0
    print(card.summary())
    for k, v in d.items():
        if v not in (None, [], {}, ""):
            print(f"  {k}: {v if not isinstance(v, (dict, list)) else json.dumps(v)}")
    return 0


def _verify(args) -> int:
    bad = 0
    for card in all_cards(verify=False):
        if not os.path.exists(card.file) and card.build is not None and not args.build:
            print(f"{card.ref}: not built yet (it is built and checked on first use; --build builds it now)")
            continue
        try:
            check_loadable(card, model_bytes(card))
            print(f"{card.ref}: ok  sha256 {card.sha256}  {card.file}")
        except (ModelIntegrityError, CardError) as exc:
            bad += 1
            print(f"{card.ref}: FAILED  {exc}")
    print(f"{bad} model(s) failed verification" if bad else "every model file matches its card")
    return 1 if bad else 0


"""Command lines made from knobs: a flag per knob, its type, domain, default and help
from the knob's one declaration, mistakes as one ``error:`` line; and the arguments
left over after a pipeline's own (Beam options pass through; anything else is refused).
"""
from __future__ import annotations

import argparse
import sys

from beamzoo.core.knobs import Knob, KnobError
from beamzoo.runners.options import OptionError, check_runner, unknown_beam_options
from beamzoo.runners.registry import RULE, batch_runners, is_beam


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line, ``error: ...`` and exit 2, and a hint to ``--help``."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message: str):
        self.exit(2, f"error: {message}\n(see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """A subcommand's parser (``beamzoo serve``) refuses what it does not know itself, so the
        hint names its own ``--help``, not the top command's."""
        ns, extras = super().parse_known_args(args, namespace)
        if extras and " " in self.prog:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _type(knob: Knob):
    def parse(text: str):
        try:
            return knob.parse(text)
        except KnobError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = knob.type.__name__  # what argparse names in "invalid ... value"
    return parse


def add_knobs(parser, knobs: dict[str, Knob], flags: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """A flag per knob of ``knobs`` (but ``skip``): ``--NAME``, or the flag ``flags`` gives a knob
    (a knob that is on by default is turned off by its flag, e.g. ``{"isolate": "no_isolation"}``).
    The value lands in ``args.NAME``, None when not given (the knob's default then applies)."""
    flags = flags or {}
    for name, knob in knobs.items():
        if name in skip:
            continue
        flag = "--" + flags.get(name, name)
        default = "" if knob.default is None else f" (default {knob.show()})"
        if knob.type is bool:
            turn = not knob.default
            parser.add_argument(flag, dest=name, action="store_const", const=turn, default=None,
                                help=knob.doc + ("" if turn else f" (on by default; {flag} turns it off)"))
            continue
        metavar = {"bytes": "SIZE", "seconds": "S"}.get(knob.unit) or ("N" if knob.type is int else
                                                                      "X" if knob.type is float else None)
        parser.add_argument(flag, dest=name, type=_type(knob), default=None, metavar=metavar,
                            choices=knob.choices, help=knob.doc + default)


def given(args: argparse.Namespace, knobs: dict[str, Knob]) -> dict:
    """The knobs a command line set (the rest keep their defaults)."""
    return {k: getattr(args, k) for k in knobs if getattr(args, k, None) is not None}


def add_runner(parser) -> None:
    parser.add_argument("--runner", default="DirectRunner",
                        help=f"{', '.join(batch_runners())} (default DirectRunner; EdgeRunner needs no Beam); {RULE}")


def number(kind, low, high=None):
    """An argparse type: a ``kind`` (int or float) between ``low`` and ``high``."""
    return _type(Knob(low, kind, low=low, high=high))


def check_leftovers(p: argparse.ArgumentParser, runner: str, rest: list[str], example: str | None = None) -> None:
    """Refuse a bad --runner, an option neither the pipeline nor Beam knows, and stray
    arguments (for a pipeline with an --input glob, ``example``, a quoted one: the shell
    may have expanded an unquoted glob)."""
    try:
        runner = check_runner(runner)
    except OptionError as exc:
        p.error(f"--runner: {exc}")
    beam = is_beam(runner)
    unknown = unknown_beam_options(rest) if rest and beam else rest
    options = [a for a in unknown if a.startswith("-")]
    if options:
        p.error(f"unknown option {options[0]}" + (f": neither {p.prog} nor Beam knows it" if beam else ""))
    if unknown:
        p.error(f"unexpected argument {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + (f": if it is one of the files of an --input glob, the shell expanded the glob; "
                   f"quote it: --input {example}" if example else f": {p.prog} takes no arguments"))


def fail(message: str) -> int:
    """A user's mistake found after parsing: one line, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


__all__ = ["Parser", "add_knobs", "add_runner", "check_leftovers", "fail", "given", "number"]

"""What the pipeline command lines share: checked numbers, and the arguments left over
after a pipeline's own (Beam options pass through; anything else is refused)."""
from __future__ import annotations

import argparse

from beamzoo.runners import is_edge
from beamzoo.runners.options import OptionError, check_runner


def number(kind, low, high=None):
    """An argparse type: a ``kind`` (int or float) between ``low`` and ``high``."""
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}" if high is not None
                                             else f"must be {low} or more, got {value}")
        return value
    return check


def seconds(low: float):
    """An argparse type: seconds (``2`` or ``2s``), at least ``low``, finite."""
    def check(text: str) -> float:
        try:
            value = float(text.removesuffix("s"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not value >= low or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be at least {low:g} seconds, got {text}")
        return value
    return check


def check_leftovers(p: argparse.ArgumentParser, runner: str, rest: list[str], example: str | None = None) -> None:
    """Refuse a bad --runner, an option neither the pipeline nor Beam knows, and stray
    arguments (for a pipeline with an --input glob, ``example``, a quoted one: the shell
    may have expanded an unquoted glob)."""
    try:
        check_runner(runner)
    except OptionError as exc:
        p.error(f"--runner: {exc}")
    unknown = rest
    if rest and not is_edge(runner):
        from beamzoo.runners.options import unknown_beam_options
        unknown = unknown_beam_options(rest)
    options = [a for a in unknown if a.startswith("-")]
    if options:
        p.error(f"unknown option {options[0]}" + ("" if is_edge(runner) else
                                                   f": neither {p.prog} nor Beam knows it"))
    if unknown:
        p.error(f"unexpected argument {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + (f": if it is one of the files of an --input glob, the shell expanded the glob; "
                   f"quote it: --input {example}" if example else f": {p.prog} takes no arguments"))

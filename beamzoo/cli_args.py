"""Command lines made from knobs: a flag per knob, its type, domain, default and help
from the knob's one declaration, mistakes as one ``error:`` line; ``--config FILE``, a
tuned config whose knobs become the flags' defaults; and the arguments left over after
a pipeline's own (Beam options pass through; anything else is refused).
"""
from __future__ import annotations

import argparse
import sys

from beamzoo.core.knobs import Knob, KnobError
from beamzoo.runners.options import OptionError, check_runner, unknown_beam_options
from beamzoo.runners.registry import RULE, batch_runners, is_beam
from beamzoo.tune.config import Config, ConfigError, read

# how the command lines spell the knobs whose flag is not their name (a knob on by default
# is turned off by its flag)
FLAG_NAMES = {"intra_op_threads": "threads", "isolate": "no_isolation", "reduced_decode": "no_reduced_decode"}


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
            action = parser.add_argument(flag, dest=name, action="store_const", const=turn, default=None,
                                         help=knob.doc + ("" if turn else f" (on by default; {flag} turns it off)"))
        else:
            metavar = {"bytes": "SIZE", "seconds": "S"}.get(knob.unit) or ("N" if knob.type is int else
                                                                          "X" if knob.type is float else None)
            action = parser.add_argument(flag, dest=name, type=_type(knob), default=None, metavar=metavar,
                                         choices=knob.choices, help=knob.doc + default)
        action.knob = knob  # what --config checks a file's value with


def given(args: argparse.Namespace, knobs: dict[str, Knob]) -> dict:
    """The knobs a command line set (the rest keep their defaults)."""
    return {k: getattr(args, k) for k in knobs if getattr(args, k, None) is not None}


def add_config(parser, graph: str, text: tuple[str, ...] = (), sections=None) -> None:
    """``--config FILE``: a tuned config of the ``graph`` graph (``beamzoo tune``, ``beamzoo.tune.config``).
    Read where it stands on the command line, its settings become the values of the flags not
    given before it, and flags after it replace them: a flag given on the command line wins.
    The settings are the file's ``knobs``, or what ``sections(config, file)`` picks, {section:
    {flag: value}} (it may refuse the config with a ``ConfigError``); each names a knob's flag
    of this parser (or one of ``text``, options whose value is text, e.g. ``model``) and is
    checked by the knob's own declaration. ``args.config`` is then the ``Config`` (its budgets,
    say), None without the flag."""
    parser.add_argument("--config", metavar="FILE", action=_ConfigFile, graph=graph, text=text, sections=sections,
                        help=f"a tuned config of the {graph} graph (written by `beamzoo tune ... --config FILE`"
                             f"{' --ocr' if graph == 'ocr' else ''}): its knobs are the defaults of these flags; "
                             "a flag given on the command line wins")


class _ConfigFile(argparse.Action):
    def __init__(self, option_strings, dest, graph, text, sections, **kw):
        super().__init__(option_strings, dest, **kw)
        self.graph, self.text, self.sections = graph, text, sections

    def __call__(self, parser, namespace, value, option_string=None):
        if isinstance(getattr(namespace, self.dest, None), Config):
            parser.error("--config is given twice; give one tuned config")
        try:
            config = read(value, self.graph)
            picked = self.sections(config, value) if self.sections else {"knobs": config.knobs}
            options = _options(parser, self.text)
            for section, settings in picked.items():
                for name, v in settings.items():
                    action = options.get(name)
                    if action is None:
                        shown = [n for n, a in options.items() if a.option_strings[-1] == "--" + n]
                        raise ConfigError(f"{value}: {section}: {name!r} is not an option of {parser.prog}; "
                                          f"its options: {', '.join(shown)}")
                    v = _setting(f"{value}: {section}", name, v, action)
                    if v is not None and getattr(namespace, action.dest, None) is None:
                        setattr(namespace, action.dest, v)
        except ConfigError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, config)


def config_budgets(args) -> dict:
    """``{"budgets": ...}``, the latency budgets of ``--config FILE`` for ``--adapt``; {} without them."""
    config = getattr(args, "config", None)
    return {"budgets": dict(config.budgets)} if isinstance(config, Config) and config.budgets else {}


def _options(parser, text: tuple[str, ...]) -> dict[str, argparse.Action]:
    """The options a config may set: by flag name (without --) and by knob name."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.option_strings and (hasattr(a, "knob") or a.dest in text):
            out.setdefault(a.option_strings[-1].removeprefix("--"), a)
    for a in list(out.values()):
        if hasattr(a, "knob"):
            out.setdefault(a.dest, a)
    return out


def _setting(where: str, name: str, value, action: argparse.Action):
    """A config's ``value`` for the option ``name`` as the parser would hold it (None: leave it)."""
    knob = getattr(action, "knob", None)
    if knob is None:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be text, got {value!r}")
        return value
    return config_value(where, name, value, knob, turns=action.const if name != action.dest else None)


def config_value(where: str, name: str, value, knob: Knob, turns=None):
    """A config file's ``value`` for ``knob`` (written as ``name``), checked by its declaration;
    ``turns``: for a flag that turns a true/false knob to this, ``name: true`` gives it and
    ``name: false`` leaves the knob as it is (None)."""
    if value is None:
        return None
    try:
        if turns is not None:
            if not isinstance(value, bool):
                raise KnobError(f"must be true or false, got {value!r}")
            return turns if value else None
        if isinstance(value, str) and knob.type in (int, float, bool):
            return knob.parse(value)  # a size or a time as a command line writes it: 512M, 2s
        return knob.check(where, name, value)
    except KnobError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(where) else f"{where}: {name}: {text}") from None


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


__all__ = ["FLAG_NAMES", "Parser", "add_config", "add_knobs", "add_runner", "check_leftovers", "config_budgets",
           "config_value", "fail", "given", "number"]

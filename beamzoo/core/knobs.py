"""Knobs: each parameter of a step, a composite, an executor or a server, declared once.

A ``Knob`` says a parameter's type, default, domain (``low``/``high`` or
``choices``), whether it can change results (only those enter a graph's
fingerprint; batch sizes and threads do not), a one-line doc, and how a
command line writes it (``unit``: ``bytes`` takes ``512M``, ``seconds``
takes ``2s``). Everything else is derived from the declaration: a class's
constructor and its signature (``declare``), the checked JSON parameters,
the errors that name the parameter, the docs, the flags and ``--help``
of the command lines (``beamzoo.cli_args``), and the values ``beamzoo tune``
tries (``tune``).

>>> k = Knob(4, int, low=1, doc="rows per call", results=False)
>>> k.check("OnnxInference", "batch_size", 8)
8
>>> k.parse("0")
Traceback (most recent call last):
...
beamzoo.core.knobs.KnobError: must be >= 1, got 0
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

SIZES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class KnobError(ValueError):
    """A parameter that does not exist, or a value outside its domain."""


@dataclass(frozen=True)
class Knob:
    """One declared parameter.

    ``type``: int, float, str, bool, list, dict or object (any value).
    ``convert``: turns a given value into the JSON data the parameter holds (a card
    into its reference, a path made absolute), before the check. ``role``: what
    generic code may find by it (``model``: the knob names a model card; bundles
    and serving find a graph's models so).
    """

    default: Any = None
    type: type = object
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    results: bool = True
    doc: str = ""
    unit: str | None = None
    convert: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)
    role: str | None = None
    required: bool = False
    tune: tuple | str | None = field(default=None, compare=False)  # the values ``beamzoo tune`` tries

    def candidates(self, cores: int) -> tuple:
        """The values ``beamzoo tune`` tries for this knob: its ``tune`` values, or with
        ``tune="cores"`` the powers of two up to twice ``cores`` (and ``cores`` itself); with
        ``tune="deciles"`` the values come from the data (the deciles of what the knob is
        compared with, a score say), which the tuner measures: none here."""
        if self.tune is None or self.tune == "deciles":
            return ()
        if self.tune == "cores":
            values = {1 << i for i in range(max(1, 2 * cores).bit_length()) if 1 << i <= 2 * cores} | {cores}
            return tuple(sorted(v for v in values if self._fits(v)))
        return tuple(v for v in self.tune if self._fits(v))

    def _fits(self, value) -> bool:
        try:
            self._valid(value)
            return True
        except KnobError:
            return False

    def check(self, owner: str, name: str, value: Any) -> Any:
        """``value`` as this knob holds it; KnobError naming ``owner`` and ``name`` if it does not fit."""
        try:
            return self._valid(value)
        except KnobError as exc:
            raise KnobError(f"{owner}: {name} {exc}") from None

    def _valid(self, value: Any) -> Any:
        if value is None:
            if self.default is None:
                return None
            raise KnobError(f"must be given (a {self.type.__name__}), got None")
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is list and isinstance(value, tuple):
            value = list(value)
        if self.type is not object and (not isinstance(value, self.type)
                                        or (self.type in (int, float) and isinstance(value, bool))):
            raise KnobError(f"must be {_a(self.type)}, got {_short(value)}")
        if self.type is float and not math.isfinite(value):
            raise KnobError(f"must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise KnobError(f"must be one of {', '.join(map(str, self.choices))}, got {_short(value)}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            if self.low is not None and self.high is not None:
                raise KnobError(f"must be between {self.show(self.low)} and {self.show(self.high)}, "
                                f"got {self.show(value)}")
            if self.low is not None:
                raise KnobError(f"must be >= {self.show(self.low)}, got {self.show(value)}")
            raise KnobError(f"must be <= {self.show(self.high)}, got {self.show(value)}")
        return value

    def given(self, owner: str, name: str, value: Any) -> Any:
        """A value a user gave: converted, then checked."""
        if self.convert is not None and value is not None:
            try:
                value = self.convert(value)
            except (KnobError, TypeError, ValueError) as exc:
                raise KnobError(f"{owner}: {name}: {exc}") from None
        return self.check(owner, name, value)

    def parse(self, text: str) -> Any:
        """A command line's text as this knob's value (``unit``-aware); KnobError if it is not one."""
        if self.type is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise KnobError(f"{text!r} is not true or false")
        if self.type in (int, float):
            value = _number(text, self.type, self.unit)
        elif self.type is str:
            value = text
        else:
            raise KnobError(f"cannot be given on a command line ({self.type.__name__})")
        return self._valid(value)

    def show(self, value: Any = ...) -> str:
        """A value (default: the default) as a person writes it."""
        v = self.default if value is ... else value
        if v is None:
            return "none"
        if self.unit == "bytes" and isinstance(v, int) and not isinstance(v, bool):
            for suffix in "TGMK":
                if v >= SIZES[suffix] and v % SIZES[suffix] == 0:
                    return f"{v // SIZES[suffix]}{suffix}"
        if isinstance(v, float):
            return f"{v:g}" + ("s" if self.unit == "seconds" else "")
        return str(v)

    def but(self, **changes) -> Knob:
        """This knob with some fields changed (a composite's own default, say)."""
        return replace(self, **changes)


def _a(t: type) -> str:
    name = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
            "list": "a list", "dict": "a mapping"}.get(t.__name__, t.__name__)
    return name


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...'"


def _number(text: str, kind: type, unit: str | None):
    t = text.strip()
    scale = 1
    if unit == "bytes" and t[-1:].upper() in SIZES:
        t, scale = t[:-1], SIZES[t[-1:].upper()]
    elif unit == "seconds" and t.endswith("s"):
        t = t[:-1]
    try:
        value = float(t) * scale if (kind is float or scale != 1) else int(t)
    except ValueError:
        what = {"bytes": "a size (bytes, or e.g. 512M, 2G)", "seconds": "a number of seconds"}.get(unit) or (
            "a whole number" if kind is int else "a number")
        raise KnobError(f"{text!r} is not {what}") from None
    return int(value) if kind is int else float(value)


# ------------------------------------------------------------------ declaring a class's knobs

def bind(owner: str, knobs: dict[str, Knob], positional: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """The checked parameters of a call ``owner(*args, **kwargs)`` of a class whose knobs are ``knobs``."""
    if len(args) > len(positional):
        takes = f"{len(positional)} ({', '.join(positional)})" if positional else "none"
        raise KnobError(f"{owner} takes {takes} positional arguments, got {len(args)}; name the others")
    given = dict(zip(positional, args))
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise KnobError(f"{owner} got {twice[0]!r} twice")
    given.update(kwargs)
    unknown = sorted(set(given) - set(knobs))
    if unknown:
        raise KnobError(f"{owner} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(knobs) or 'none'}")
    missing = [k for k, knob in knobs.items() if knob.required and given.get(k) is None]
    if missing:
        raise KnobError(f"{owner} needs {', '.join(missing)}")
    return {k: knob.given(owner, k, given[k]) if k in given else _fresh(knob.default) for k, knob in knobs.items()}


def _fresh(default: Any) -> Any:
    """A default for one instance: a list or dict of its own, never the declaration's."""
    return copy.deepcopy(default) if isinstance(default, (list, dict)) else default


def checked(owner: str, knobs: dict[str, Knob], params: dict) -> dict:
    """JSON parameters (from a graph) checked against ``knobs``; unknown ones refused."""
    unknown = sorted(set(params) - set(knobs))
    if unknown:
        raise KnobError(f"{owner} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(knobs) or 'none'}")
    return {k: knob.check(owner, k, params[k] if k in params else _fresh(knob.default)) for k, knob in knobs.items()}


def signature(knobs: dict[str, Knob], positional: tuple[str, ...], extra: tuple[str, ...] = ("id",),
              lead: tuple[str, ...] = ()) -> inspect.Signature:
    """The constructor's signature the knobs make (what ``help()`` and editors show); ``lead``:
    required arguments before the knobs, ``extra``: keywords after them."""
    P = inspect.Parameter

    def default(k: Knob):
        return P.empty if k.required else k.default
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in lead]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=default(knobs[n])) for n in positional]
    params += [P(n, P.KEYWORD_ONLY, default=default(k)) for n, k in knobs.items() if n not in positional]
    params += [P(n, P.KEYWORD_ONLY, default=None) for n in extra]
    return inspect.Signature(params)


def table(knobs: dict[str, Knob]) -> str:
    """The knobs as a docstring section."""
    if not knobs:
        return ""
    lines = ["Knobs:"]
    for name, k in knobs.items():
        speed = "" if k.results else " [speed only]"
        lines.append(f"    {name} = {k.show()}: {k.doc or k.type.__name__}{speed}")
    return "\n".join(lines)


def declare(cls, extra: tuple[str, ...] = ("id",), lead: tuple[str, ...] = ()) -> None:
    """Give a class with ``knobs`` (and ``positional``) its signature and a docstring section
    listing them; called for every subclass of a class that declares knobs."""
    knobs = cls.__dict__.get("knobs")
    if knobs is None and "positional" not in cls.__dict__:
        return
    knobs = cls.knobs
    positional = tuple(getattr(cls, "positional", ()))
    missing = [n for n in positional if n not in knobs]
    if missing:
        raise TypeError(f"{cls.__name__}.positional names {missing}, which are not its knobs")
    cls.__signature__ = signature(knobs, positional, extra, lead)
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    if "Knobs:" not in doc:
        cls.__doc__ = (doc + "\n\n" + table(knobs)).strip()


def pick(owner, *names: str, **renamed: str) -> dict[str, Knob]:
    """Some of ``owner``'s knobs (a class or a dict), the very same declarations, for a
    composite or a command that passes them on; ``renamed``: {new name: owner's name}."""
    knobs = owner if isinstance(owner, dict) else owner.knobs
    out = {n: knobs[n] for n in names}
    out.update({new: knobs[old] for new, old in renamed.items()})
    return out


__all__ = ["Knob", "KnobError", "bind", "checked", "declare", "pick", "signature", "table"]

"""A tuned config: the knobs ``beamzoo tune`` chose, as the file the commands read with ``--config``.

    # written by: beamzoo tune --input 'photos/*.jpg' --target throughput>=80 --config tuned.yaml
    beamzoo: tuned config 1
    graph: classify
    knobs: {model: efficientnet_lite0_int8:1, batch_size: 8, threads: 1, workers: 2}
    serve: {max_batch: 8, max_delay_ms: 5.0}
    budgets: {classify/infer: 0.004}
    targets: ['throughput>=80']
    predicted: {throughput: 91.0, cost: 0.021}
    measured: {throughput: 88.4, cost: 0.022}

``knobs`` are command-line flags (as ``score_images.py`` spells them, without ``--``) and
their values; ``serve`` is ``beamzoo serve``'s; ``budgets`` are each step's latency budget
in seconds per row, what ``--adapt`` keeps to. What the names and values mean is checked
by the command that reads the file (``beamzoo.cli_args``); here, its shape.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "tuned.yaml")
>>> write(path, Config("ocr", {"batch_size": 8}, command="beamzoo tune --ocr"))
>>> read(path, "ocr").knobs
{'batch_size': 8}
>>> read(path, "classify")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
beamzoo.tune.config.ConfigError: ...tuned.yaml: a config for the ocr graph (ocr_images.py, ...); this command runs the classify graph
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import yaml

from beamzoo.tune.result import Target, TargetError, parse_target

MARKER = "tuned config 1"
GRAPHS = {"classify": "score_images.py, beamzoo serve", "ocr": "ocr_images.py, beamzoo tune --ocr"}
KEYS = ("beamzoo", "graph", "knobs", "serve", "budgets", "targets", "predicted", "measured")
MAX_BYTES = 1 << 20  # a tuned config is a few lines
WRITTEN_BY = "# written by: "


class ConfigError(ValueError):
    """A config file that cannot be used: one line naming the file and the key."""


@dataclass
class Config:
    graph: str  # classify | ocr
    knobs: dict = field(default_factory=dict)  # command-line flag (no --) -> value
    serve: dict | None = None  # beamzoo serve's flags -> values (tuned with --serve)
    budgets: dict = field(default_factory=dict)  # step id -> latency budget, seconds per row
    targets: list = field(default_factory=list)  # as written: "throughput>=80"
    predicted: dict = field(default_factory=dict)  # metric -> value
    measured: dict = field(default_factory=dict)
    command: str = ""  # the command that wrote it (the file's first line)


class _Loader(yaml.SafeLoader):
    """YAML without anchors and aliases (as the cards are read): a few lines of aliases can
    make gigabytes of data."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "a tuned config has no anchors (&) or aliases (*)",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read(path, graph: str) -> Config:
    """The config in ``path``, for a command that runs ``graph``; ConfigError if it cannot be used."""
    where = os.fspath(path)
    data, command = _load(where)
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is not a key of a tuned config; the keys are {', '.join(KEYS)}")
    if data.get("beamzoo") != MARKER:
        got = data.get("beamzoo")
        raise ConfigError(f"{where}: " + (f"is a {got!r}; this beamzoo reads a {MARKER!r}" if got is not None else
                                          f"is not a tuned config (it has no 'beamzoo: {MARKER}' line); "
                                          "write one with beamzoo tune ... --config FILE"))
    have = data.get("graph")
    if have not in GRAPHS:
        raise ConfigError(f"{where}: graph: must be one of {', '.join(GRAPHS)}, got {have!r}")
    if have != graph:
        raise ConfigError(f"{where}: a config for the {have} graph ({GRAPHS[have]}); "
                          f"this command runs the {graph} graph")
    serve = data.get("serve")
    return Config(graph=have, knobs=_settings(where, "knobs", data.get("knobs")),
                  serve=None if serve is None else _settings(where, "serve", serve),
                  budgets=_budgets(where, data.get("budgets")), targets=_targets(where, data.get("targets")),
                  predicted=_figures(where, "predicted", data.get("predicted")),
                  measured=_figures(where, "measured", data.get("measured")), command=command)


def _load(where: str) -> tuple[dict, str]:
    try:
        with open(where, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; write one with beamzoo tune ... --config {where}") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a folder, not a tuned config file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{where}: is larger than {MAX_BYTES >> 20} MiB; a tuned config is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: is not valid YAML{at}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{where}: is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys ({', '.join(KEYS)}), got {type(data).__name__}")
    first = text.split("\n", 1)[0]
    return data, first[len(WRITTEN_BY):].strip() if first.startswith(WRITTEN_BY) else ""


SCALARS = (str, int, float, bool)


def _settings(where: str, key: str, value) -> dict:
    """A section of flag -> value (``knobs``, ``serve``): names as text, values plain."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: must be a mapping of option -> value, got {type(value).__name__}")
    for name, v in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: {key}: option names are text, got {name!r}")
        if v is not None and not isinstance(v, SCALARS):
            raise ConfigError(f"{where}: {key}: {name} must be a number, text or true/false, "
                              f"got {type(v).__name__}")
    return dict(value)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _budgets(where: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: budgets: must be a mapping of step id -> seconds per row, "
                          f"got {type(value).__name__}")
    for step, s in value.items():
        if not isinstance(step, str) or not step:
            raise ConfigError(f"{where}: budgets: step ids are text, got {step!r}")
        if not _number(s) or s <= 0:
            raise ConfigError(f"{where}: budgets: {step} must be a positive number of seconds per row, got {s!r}")
    return {k: float(v) for k, v in value.items()}


def _targets(where: str, value) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"{where}: targets: must be a list of targets as text, e.g. ['throughput>=80']")
    for t in value:
        try:
            parse_target(t)
        except TargetError as exc:
            raise ConfigError(f"{where}: targets: {exc}") from None
    return list(value)


def _figures(where: str, key: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and (v is None or _number(v))
                                              for k, v in value.items()):
        raise ConfigError(f"{where}: {key}: must be a mapping of metric -> number")
    return dict(value)


def _plain(value):
    """A value YAML's safe dumper writes: numpy scalars as Python's."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, SCALARS):
        return value.item()
    return value


def write(path, config: Config) -> None:
    """Write ``config`` to ``path`` (replacing it whole), the command that wrote it on the first line."""
    if config.graph not in GRAPHS:
        raise ConfigError(f"{os.fspath(path)}: graph: must be one of {', '.join(GRAPHS)}, got {config.graph!r}")
    parts = []
    if config.command:
        parts.append(WRITTEN_BY + " ".join(config.command.split()) + "\n")
    parts.append(yaml.safe_dump({"beamzoo": MARKER, "graph": config.graph}, sort_keys=False))
    block = {"knobs": config.knobs, "serve": config.serve, "budgets": config.budgets}
    for key, value in block.items():
        if value is not None:
            parts.append(yaml.safe_dump({key: _plain(value)}, sort_keys=False, default_flow_style=False))
    targets = [t.text if isinstance(t, Target) else str(t) for t in config.targets]
    flow = {"targets": targets, "predicted": config.predicted, "measured": config.measured}
    for key, value in flow.items():
        text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=1 << 16)
        parts.append(f"{key}: {text.strip()}\n")
    text = "".join(parts)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


__all__ = ["Config", "ConfigError", "GRAPHS", "read", "write"]

"""The executors by name: what ``--runner`` resolves through.

One rule names a runner everywhere: its registered name, in any case, with or
without ``Runner`` at its end (``EdgeRunner``, ``edge``, ``FLINK``). beamzoo's
own executors are registered here; any other runner Apache Beam knows
(``PrismRunner``, ``DataflowRunner``, ...) runs through the Beam executor.
Executors are imported when a run asks for them, so a device without Beam
never imports it.
"""
from __future__ import annotations

import importlib

# name -> (module, class, whether it runs batch pipelines from --runner)
EXECUTORS = {
    "EdgeRunner": ("beamzoo.runners.edge", "EdgeRunner", True),
    "DirectRunner": ("beamzoo.runners.beam", "BeamRunner", True),
    "FlinkRunner": ("beamzoo.runners.beam", "BeamRunner", True),
    "InlineRunner": ("beamzoo.runners.inline", "InlineRunner", False),
}
RULE = "a runner is named in any case, with or without 'Runner' at its end (edge, EdgeRunner, flink ...)"


class UnknownRunner(ValueError):
    """No executor of that name."""


def _key(name: str) -> str:
    k = name.strip().lower()
    return k[:-6] if k.endswith("runner") and len(k) > 6 else k


def _beam_runners() -> dict[str, str]:
    try:
        from apache_beam.runners.runner import _RUNNER_MAP
    except ImportError:
        return {}
    return {_key(v.rsplit(".", 1)[1]): v.rsplit(".", 1)[1] for v in _RUNNER_MAP.values()}


def batch_runners() -> list[str]:
    """beamzoo's runners for batch pipelines, as ``--runner`` lists them."""
    return [n for n, (_, _, batch) in EXECUTORS.items() if batch]


def resolve(name: str) -> str:
    """The registered name of runner ``name`` (see ``RULE``); UnknownRunner lists what there is."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownRunner(f"a runner needs a name: {', '.join(batch_runners())}")
    if "." in name:  # a Beam runner class, by its module path
        return name
    mine = {_key(n): n for n in EXECUTORS}
    k = _key(name)
    if k in mine:
        return mine[k]
    beam = _beam_runners()
    if k in beam:
        return beam[k]
    others = sorted(set(beam.values()) - set(EXECUTORS))
    raise UnknownRunner(f"unknown runner {name!r}: beamzoo runs {', '.join(batch_runners())}"
                        + (f"; Beam also has {', '.join(others)}" if others else "") + f" ({RULE})")


def is_beam(name: str) -> bool:
    """Whether ``name`` runs through Apache Beam."""
    resolved = resolve(name)
    return resolved not in EXECUTORS or EXECUTORS[resolved][1] == "BeamRunner"


def executor_class(name: str):
    """The executor class of runner ``name`` (imported now)."""
    resolved = resolve(name)
    module, cls, _ = EXECUTORS.get(resolved, ("beamzoo.runners.beam", "BeamRunner", True))
    return getattr(importlib.import_module(module), cls)


__all__ = ["EXECUTORS", "RULE", "UnknownRunner", "batch_runners", "executor_class", "is_beam", "resolve"]

"""Runners: the edge runner (no Beam) and the dispatch to Beam's runners."""
from __future__ import annotations

from beamzoo.runners.edge import EdgeRunner, RunStats

EDGE_NAMES = ("EdgeRunner", "beamzoo.runners.EdgeRunner", "edge")

__all__ = ["EdgeRunner", "RunStats", "EDGE_NAMES", "is_edge"]


def is_edge(runner: str | None) -> bool:
    return runner in EDGE_NAMES

"""Executors: the edge runner (no Beam), Beam's runners, the in-thread runner of serving and
calibration, and what they need (file writers, Beam options, Flink)."""
from beamzoo.runners.registry import executor_class, is_beam, resolve

__all__ = ["executor_class", "is_beam", "resolve"]

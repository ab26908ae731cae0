"""What a tuning run is given: the graph, its inputs and the sample drawn from them, the targets,
the objective's prices, and the machine.

>>> evenly(list("abcdefghij"), 4)
['a', 'c', 'f', 'h']
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from beamzoo.core.knobs import Knob
from beamzoo.transforms.io import is_remote, list_files
from beamzoo.transforms.sources import Manifest, NoInputs
from beamzoo.tune.measure import run_config
from beamzoo.tune.result import Target

SAMPLE = Knob(200, int, low=1, results=False, doc="inputs drawn evenly from --input that every measurement runs on")


def evenly(items: list, n: int) -> list:
    """``n`` of ``items`` spread evenly over them (all of them when there are no more)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def inputs_of(pattern: str) -> list[str]:
    """The files ``--input`` names: a glob, a folder, or a manifest's paths."""
    if pattern.lower().endswith((".csv", ".parquet")):
        paths = [p for p in Manifest(pattern).table().column("path").to_pylist() if p]
    else:
        paths = list_files(pattern)
    if not paths:
        raise NoInputs(f"--input {pattern}: nothing matches")
    remote = next((p for p in paths if is_remote(p)), None)
    if remote:
        raise NoInputs(f"--input: {remote} is not a local file; beamzoo tune measures on local files "
                       "(copy a sample of them here)")
    return paths


def sample_folder(paths: list[str], folder: str) -> str:
    """A folder of links to ``paths`` (each once, in order), which a graph reads as its input."""
    os.makedirs(folder, exist_ok=True)
    for i, p in enumerate(paths):
        os.symlink(os.path.abspath(p), os.path.join(folder, f"{i:06d}_{os.path.basename(p)}"))
    return folder


@dataclass
class Job:
    """One tuning run's inputs. ``graph``: a ``beamzoo.tune.graphs`` maker; ``sample``: the
    sample's files (links in ``sample_dir``); ``warm_dir``: two of them, run before each
    measurement so that its models are loaded outside it (the first measurement also runs the
    whole sample once before it); ``total``: the inputs of ``--input``;
    ``rate``: requests/s with ``--serve``; ``costs``: prices (``beamzoo.tune.predict.Costs``)
    or None for CPU-core seconds."""

    graph: object
    sample: list[str]
    sample_dir: str
    warm_dir: str
    total: int
    targets: list[Target]
    cores: int
    costs: object = None
    serve: bool = False
    rate: float | None = None
    reference: str | None = None  # the model whose answers agreement is measured against
    workdir: str = ""
    say: Callable[[str], None] = field(default=lambda line: None, repr=False)
    measuring_s: float = 0.0  # wall seconds spent measuring so far
    reference_answers: dict | None = field(default=None, repr=False)  # the reference's, once measured
    warmed: bool = False  # a first run on the whole sample has warmed the process

    @classmethod
    def make(cls, graph, pattern: str, n: int, targets: list[Target], workdir: str | None = None, **kw) -> Job:
        """The job for ``graph`` on ``n`` inputs drawn evenly from ``pattern``."""
        paths = inputs_of(pattern)
        sample = evenly(paths, n)
        workdir = workdir or tempfile.mkdtemp(prefix="beamzoo-tune-")
        sample_dir = sample_folder(sample, os.path.join(workdir, "sample"))
        warm_dir = sample_folder(sample[:2], os.path.join(workdir, "warm"))
        kw.setdefault("cores", os.cpu_count() or 1)
        for p in sample:  # into the page cache: the first measurement must not pay for the disk
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        return cls(graph, sample, sample_dir, warm_dir, len(paths), targets, workdir=workdir, **kw)

    def measure(self, config: dict) -> dict:
        """Run ``config`` on the sample (a whole-graph run, ``beamzoo.tune.measure``): throughput,
        latency_p95, cost (CPU-core seconds per input), agreement with ``reference`` (its answers
        measured once, at its defaults), seconds, inputs, failed."""
        if self.reference_answers is None and self.reference:
            self.reference_answers = run_config(self, {"model": self.reference, "workers": 1}).answers
        return run_config(self, config, self.reference_answers).values


__all__ = ["Job", "SAMPLE", "evenly", "inputs_of", "sample_folder"]

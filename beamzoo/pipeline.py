"""beamzoo's own pipeline API: one pipeline file, every runner.

    import beamzoo as bz

    p = bz.Pipeline()
    preds = p | bz.Files("photos/**/*.jpg") | bz.Classify("efficientnet_lite0", topk=5)
    preds | bz.WriteParquet("out/predictions")
    p.dead_letters | bz.WriteParquet("out/dead_letter")
    stats = p.run(["--runner=EdgeRunner"])        # or DirectRunner, FlinkRunner

``run`` locks the outputs, keys every row for resume, and runs the graph on
the edge runner (no Beam needed) or through Beam.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import NoReturn

from beamzoo.core import KnobError
from beamzoo.graph import DEAD, Composite, Graph, GraphError, Stream
from beamzoo.outdir import OutputLocked, lock_output
from beamzoo.resume import CorruptOutput, OutputNotEmpty, check_outputs, run_id, sink_dirs, with_keys
from beamzoo.runners import EdgeRunner, RunStats, is_edge
from beamzoo.runners.options import OptionError, check_runner, runner_of
from beamzoo.runners.sinks import remove_stale_temporaries
from beamzoo.schemas import SchemaMismatchError
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.io import ReadFiles, any_file, read_limits
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files, Manifest
from beamzoo.zoo import CardError, ModelCard, ModelIntegrityError, SelectorError, UnknownModel


def classifier_problem(card: ModelCard) -> str | None:
    """Why ``card`` cannot classify images (one image input, one output of scores), or None."""
    if card.task != "image-classification":
        return f"is a {card.task} model, not an image classifier"
    if len(card.inputs) != 1 or card.inputs[0].spec.layout not in ("NCHW", "NHWC") or not card.input.fixed:
        return "does not take one fixed-size image input (layout NCHW or NHWC)"
    if len(card.outputs) != 1 or len(card.output.shape) != 1 or not card.output.fixed:
        return "does not give one output of class scores"
    return None


class NoInputs(FileNotFoundError):
    """Nothing matches an input pattern."""


class Classify(Composite):
    """paths -> predictions for an image classifier: read, decode (at reduced size where
    the resize allows), resize and crop as the card says, infer, top-k.

    ``knobs``: ``batch_size``, ``intra_op_threads``, ``max_pixels``, ``max_bytes``,
    ``shrink``, ``reduced_decode``, ``prefix`` (of the prediction columns); ``limits``:
    the decode step's ``time_limit`` (the read's too), ``memory_limit`` and ``isolate``.
    """

    def __init__(self, model: ModelCard | str = "efficientnet_lite0", topk: int = 5, batch_size: int = 4,
                 intra_op_threads: int = 1, max_pixels: int = 100_000_000, max_bytes: int = 256 << 20,
                 shrink: str = "area", reduced_decode: bool = True, prefix: str = "", **limits):
        self.card = ModelCard.from_param(model)
        problem = classifier_problem(self.card)
        if problem:
            raise KnobError(f"Classify: {self.card.ref} {problem}")
        self.resize = ResizeCrop.for_input(self.card.input, resize=self.card.resize, shrink=shrink)
        self.decode = DecodeImage(max_pixels=max_pixels, channels=self.card.input.channels,
                                  min_side=self.resize.resize if reduced_decode else None, **limits)
        self.read = ReadFiles(max_bytes=max_bytes, **read_limits(limits))
        self.infer = OnnxInference(self.card, batch_size=batch_size, intra_op_threads=intra_op_threads)
        self.topk = TopK(self.card, k=topk, prefix=prefix)

    def expand(self, stream: Stream) -> Stream:
        return stream | self.read | self.decode | self.resize | self.infer | self.topk


class Pipeline:
    """Holds the graph being built; ``p | source`` starts a stream, sinks end them."""

    def __init__(self):
        self.graph: Graph | None = None

    def _add(self, graph: Graph) -> None:
        self.graph = graph if self.graph is None else self.graph.union(graph)

    def __or__(self, source) -> Stream:
        stream = Graph.source(source)
        return Stream(stream.graph, stream.ref, self)

    @property
    def dead_letters(self) -> Stream:
        """The dead letters of every step (``id``, ``source``, ``stage``, ``error``, ``key``)."""
        if self.graph is None:
            raise GraphError("start the pipeline with a source before asking for its dead letters")
        return _DeadLetters(self)

    def run(self, argv: list[str] | None = None, runner: str | None = None, resume: bool = False,
            edge: EdgeRunner | None = None) -> RunStats:
        """Run on ``--runner`` of ``argv`` (or ``runner``; default DirectRunner)."""
        argv = list(argv or ())
        name = runner or runner_of(argv)
        argv = [a for a in argv if not a.startswith("--runner")]
        return run(self.graph, name, argv, edge=edge, resume=resume)


class _DeadLetters(Stream):
    def __init__(self, pipeline: Pipeline):
        super().__init__(pipeline.graph, DEAD, pipeline)


def run(graph: Graph | None, runner: str = "DirectRunner", beam_args: list[str] = (),
        edge: EdgeRunner | None = None, resume: bool = False, progress: bool = True) -> RunStats:
    """Run a graph to the end on the edge runner or a Beam runner; the counts of this run."""
    if graph is None or not any(s.kind == "sink" for s in graph.steps):
        raise GraphError("the pipeline writes nothing: add a sink, e.g. rows | WriteParquet('out/predictions')")
    runner = check_runner(runner)
    for s in graph.steps:
        if s.op == "files" and not any_file(s.params["pattern"]):
            raise NoInputs(
                f"no files match {s.params['pattern']!r}; check the pattern, and quote it so the shell "
                "does not expand it (e.g. --input 'photos/**/*.jpg')")
    with _locked(sink_dirs(graph)):
        check_outputs(graph, resume)
        if resume:
            for d in sink_dirs(graph):
                remove_stale_temporaries(d)
        keyed = with_keys(graph, resume)
        name = run_id()
        if is_edge(runner):
            return (edge or EdgeRunner()).run(keyed, name)
        from beamzoo.runners import beam
        start, wall = time.perf_counter(), time.time()
        m = beam.run(keyed, [f"--runner={runner}", *beam_args], name, progress)
        c = m.counters
        first = None if m.first_output is None else max(0.0, m.first_output - wall)
        return RunStats(c.get("inputs", 0), c.get("scored", 0), c.get("failed", 0), c.get("skipped", 0),
                        time.perf_counter() - start, first,
                        counters={k: v for k, v in c.items() if k not in ("inputs", "scored", "failed", "skipped")
                                  and not k.endswith(("_rows", "_failed"))})  # the steps' own counts


@contextlib.contextmanager
def _locked(directories: list[str]):
    with contextlib.ExitStack() as stack:
        for d in sorted(set(os.path.dirname(d) or d for d in directories)):
            stack.enter_context(lock_output(d))
        yield


def score_images(pattern: str, output: str, card: ModelCard | str = "efficientnet_lite0", k: int = 5,
                 batch_size: int = 4, max_pixels: int = 100_000_000, max_bytes: int = 256 << 20,
                 intra_op_threads: int = 1, reduced_decode: bool = True, shrink: str = "area",
                 derived_only: bool = False, escalate: ModelCard | str | None = None, escalate_below: float = 0.5,
                 deadline_s: float | None = None, escalation_s: float = 0.0, gates: list[dict] = (),
                 **limits) -> Graph:
    """files -> classify -> ``output/predictions``, dead letters -> ``output/dead_letter``.

    ``escalate``: a stronger model for the rows scored below ``escalate_below`` (a
    ``Cascade``); ``deadline_s``: each row's deadline; ``gates``: ``Gate`` keyword
    arguments each (diverted rows -> ``output/review``). A ``.csv`` or ``.parquet``
    ``pattern`` is a manifest (its ``uri`` column, other columns pass through).

    The defaults suit a CPU: each worker thread runs the whole chain on its
    own small batch with a one-thread onnxruntime session, so decoding and
    inference keep every core busy without fighting over them. ``limits``: the decode
    step's ``time_limit`` (the read's too), ``memory_limit`` and ``isolate``.
    """
    from beamzoo.cascade import Cascade
    from beamzoo.gates import with_gates
    from beamzoo.policies import Deadline
    p = Pipeline()
    rows = p | (Manifest(pattern) if pattern.lower().endswith((".csv", ".parquet")) else Files(pattern))
    if deadline_s is not None:
        rows = rows | Deadline(deadline_s)
    kw = dict(topk=k, batch_size=batch_size, intra_op_threads=intra_op_threads, max_pixels=max_pixels,
              max_bytes=max_bytes, shrink=shrink, reduced_decode=reduced_decode, **limits)
    preds = rows | (Classify(card, **kw) if escalate is None else
                    Cascade(card, escalate, below=escalate_below, escalation_s=escalation_s, **kw))
    preds = with_gates(preds, gates, os.path.join(output, "review"), derived_only=derived_only)
    preds | WriteParquet(os.path.join(output, "predictions"), derived_only=derived_only)
    p.dead_letters | WriteParquet(os.path.join(output, "dead_letter"), id="write_dead_letters")
    return p.graph


def interrupted() -> NoReturn:
    """Ctrl-C in a command: one line, exit 130, now. Not through the interpreter's exit:
    Beam's gRPC and onnxruntime threads may still run, and a C++ thread that outlives
    the interpreter aborts the process (SIGABRT). The run has already let go of its
    outputs (lock released, nothing under final names)."""
    print("interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def user_errors() -> tuple[type[BaseException], ...]:
    """Mistakes a user can fix: command-line tools print these as ``error:`` lines, exit 2.
    Anything else is a failure of the program or its surroundings: a traceback, exit 1."""
    return (NoInputs, OutputNotEmpty, SchemaMismatchError, CardError, ModelIntegrityError, SelectorError,
            UnknownModel, GraphError, OptionError, CorruptOutput, OutputLocked, KnobError)

"""beamzoo's own pipeline API: one pipeline file, every runner.

    import beamzoo as bz

    p = bz.Pipeline()
    preds = p | bz.Files("photos/**/*.jpg") | bz.Classify("efficientnet_lite0", topk=5)
    preds | bz.WriteParquet("out/predictions")
    p.dead_letters | bz.WriteParquet("out/dead_letter")
    stats = p.run(["--runner=EdgeRunner"])        # or DirectRunner, FlinkRunner

``run`` checks the inputs, locks the outputs, compiles the graph for the
executor ``--runner`` names (with resume keys), runs it in a run context of
its own, and stops a run whose steps only fail (the dead-letter limit).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Callable, NoReturn

from beamzoo.cascade import Cascade
from beamzoo.classify import DEFAULT_MODEL, Classify
from beamzoo.core.context import Hooks, RunContext
from beamzoo.core.executor import Executor
from beamzoo.core.graph import Graph, GraphBuilder, GraphError
from beamzoo.core.knobs import KnobError
from beamzoo.core.limits import DEFAULT_MAX_FRACTION, DeadLetterLimit, TooManyDeadLetters
from beamzoo.core.metrics import RunStats
from beamzoo.core.schemas import SchemaMismatchError
from beamzoo.gates import with_gates
from beamzoo.outdir import OutputLocked, lock_output
from beamzoo.report import Timeline, report_run
from beamzoo.runners.edge import EdgeRunner
from beamzoo.runners.options import OptionError, check_runner, runner_of
from beamzoo.runners.registry import executor_class, is_beam
from beamzoo.runners.sinks import remove_stale_temporaries
from beamzoo.transforms.deadline import Deadline
from beamzoo.transforms.resume import RESUME_BY, CorruptOutput, OutputNotEmpty, check_outputs, keying, sink_dirs
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files, Manifest, NoInputs
from beamzoo.zoo import CardError, ModelCard, ModelIntegrityError, SelectorError, UnknownModel


class Pipeline(GraphBuilder):
    """Holds the graph being built; ``p | source`` starts a stream, sinks end them."""

    def run(self, argv: list[str] | None = None, runner: str | None = None, resume: bool = False,
            edge: EdgeRunner | None = None, **kw) -> RunStats:
        """Run on ``--runner`` of ``argv`` (or ``runner``; default DirectRunner); ``kw``: ``run``'s."""
        argv = list(argv or ())
        name = runner or runner_of(argv)
        argv = [a for a in argv if not a.startswith("--runner")]
        return run(self.graph, name, argv, edge=edge, resume=resume, **kw)


def executor(runner: str, argv: list[str] = (), edge: EdgeRunner | None = None, progress: bool = True) -> Executor:
    """The executor ``runner`` names (``beamzoo.runners.registry``), made for this run."""
    name = check_runner(runner)
    if is_beam(name):
        return executor_class(name)(name, argv, progress)
    if name == EdgeRunner.name:
        return edge or EdgeRunner(progress=progress)
    return executor_class(name)()


def run(graph: Graph | None, runner: str = "DirectRunner", beam_args: list[str] = (),
        edge: EdgeRunner | None = None, resume: bool = False, progress: bool = True,
        clock: Callable[[], float] | None = None, max_dead_fraction: float = DEFAULT_MAX_FRACTION,
        hooks: list[Hooks] = (), resume_by: str = RESUME_BY.default) -> RunStats:
    """Run a graph to the end on the executor ``runner`` names; the counts of this run.

    ``clock``: the run's clock (seconds since the epoch; tests stand time still).
    ``max_dead_fraction``: the dead-letter limit (``beamzoo.core.limits``); 1 turns it off.
    ``hooks``: more ``Hooks`` for the run's context.
    ``resume_by``: what keys the rows for a resume, ``stat`` or ``content`` (``beamzoo.transforms.resume``).
    """
    if graph is None or not any(s.kind == "sink" for s in graph.steps):
        raise GraphError("the pipeline writes nothing: add a sink, e.g. rows | WriteParquet('out/predictions')")
    _one_process(graph, runner)
    ex = executor(runner, beam_args, edge, progress)
    for s in graph.steps:
        if s.kind == "source":
            s.operator().check_inputs()
    try:
        limit = DeadLetterLimit(max_dead_fraction)
    except ValueError as exc:
        raise KnobError(f"max_dead_fraction: {exc}") from None
    resume_by = RESUME_BY.check("run", "resume_by", resume_by)
    outputs = sink_dirs(graph)
    with _locked(outputs):
        check_outputs(graph, resume)
        if resume:
            for d in outputs:
                remove_stale_temporaries(d)
        plan = ex.compile(graph, before=(keying(outputs, resume, resume_by),))
        ctx = RunContext(clock=clock, hooks=[limit, *hooks])
        stats = ex.execute(plan, ctx)
    failure = ctx.failure or limit.check(stats.steps)
    if failure is not None:
        failure.stats = stats
        raise failure
    return stats


def _one_process(graph: Graph, runner: str) -> None:
    """A step that keeps state across batches (``Operator.one_process``: one that follows its
    model's newest version) needs the graph in one long-lived process; a Beam runner's workers
    are not that."""
    following = [s.id for s in graph.steps if s.operator().one_process()]
    name = check_runner(runner)
    if following and is_beam(name):
        raise KnobError(f"step {following[0]!r}: model_refresh needs a runner that keeps the graph in one "
                        f"long-lived process (EdgeRunner); {name} runs it through Beam")


@contextlib.contextmanager
def _locked(directories: list[str]):
    with contextlib.ExitStack() as stack:
        for d in sorted(set(os.path.dirname(d) or d for d in directories)):
            stack.enter_context(lock_output(d))
        yield


def score_images(pattern: str, output: str, model: ModelCard | str = DEFAULT_MODEL, escalate=None,
                 deadline: float | None = None, gates: list[dict] = (), derived_only: bool = False,
                 **knobs) -> Graph:
    """files -> classify -> ``output/predictions``, dead letters -> ``output/dead_letter``.

    ``knobs`` are ``Classify``'s (or, with ``escalate``, a stronger model for the rows
    scored below ``below``, ``Cascade``'s); ``deadline``: each row's deadline in seconds;
    ``gates``: ``Gate`` keyword arguments each (diverted rows -> ``output/review``). A
    ``.csv`` or ``.parquet`` ``pattern`` is a manifest (its ``uri`` column, other
    columns pass through).

    The defaults suit a CPU: each worker thread runs the whole chain on its
    own small batch with a one-thread onnxruntime session, so decoding and
    inference keep every core busy without fighting over them.
    """
    p = Pipeline()
    rows = p | (Manifest(pattern) if pattern.lower().endswith((".csv", ".parquet")) else Files(pattern))
    if deadline is not None:
        rows = rows | Deadline(deadline)
    preds = rows | (Classify(model, **knobs) if escalate is None else Cascade(model, escalate, **knobs))
    preds = with_gates(preds, gates, os.path.join(output, "review"), derived_only=derived_only)
    preds | WriteParquet(os.path.join(output, "predictions"), derived_only=derived_only)
    p.dead_letters | WriteParquet(os.path.join(output, "dead_letter"), id="write_dead_letters")
    return p.graph


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is (``on_sigterm``): the run stops the same way."""


def on_sigterm() -> None:
    """In a command: SIGTERM ends a run as Ctrl-C does (what was written is committed), exit 143."""
    def terminate(signum, frame):
        raise Terminated
    signal.signal(signal.SIGTERM, terminate)


def run_command(graph: Graph, args, beam_args: list[str], edge: EdgeRunner, progress: bool) -> RunStats:
    """A command line's run (``score_images.py``, ``ocr_images.py``): ``run`` with the flags
    ``--runner``, ``--resume``, ``--resume_by``, ``--max_dead_fraction``; then ``--profile FILE``
    and ``OUT/report.html`` are written, also when the dead-letter limit stops the run."""
    timeline = Timeline()
    knobs = {k: getattr(args, k) for k in ("resume_by", "max_dead_fraction") if getattr(args, k, None) is not None}
    try:
        stats = run(graph, args.runner, beam_args, edge=edge, resume=args.resume, progress=progress,
                    hooks=[timeline], **knobs)
    except TooManyDeadLetters as exc:
        _keep(args, exc.stats, timeline)
        raise
    _keep(args, stats, timeline)
    return stats


def _keep(args, stats: RunStats, timeline: Timeline) -> None:
    if args.profile:
        stats.write_profile(args.profile)
        print(f"per-step metrics written to {args.profile}")
    report_run(args.output, stats, timeline)


def interrupted(exc: BaseException | None = None) -> NoReturn:
    """Ctrl-C (exit 130) or SIGTERM (143) in a command: one line, now. Not through the
    interpreter's exit: Beam's gRPC and onnxruntime threads may still run, and a C++ thread
    that outlives the interpreter aborts the process (SIGABRT). The run has already let go
    of its outputs (lock released; on the edge runner what was written is committed, under
    final names only if complete)."""
    terminated = isinstance(exc, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(143 if terminated else 130)


def user_errors() -> tuple[type[BaseException], ...]:
    """Mistakes a user can fix: command-line tools print these as ``error:`` lines, exit 2.
    Anything else is a failure of the program or its surroundings: a traceback, exit 1."""
    return (NoInputs, OutputNotEmpty, SchemaMismatchError, CardError, ModelIntegrityError, SelectorError,
            UnknownModel, GraphError, OptionError, CorruptOutput, OutputLocked, KnobError)


TOO_MANY_DEAD = 4  # the exit code of a run the dead-letter limit stopped

__all__ = ["Classify", "Pipeline", "TOO_MANY_DEAD", "Terminated", "TooManyDeadLetters", "executor", "interrupted",
           "on_sigterm", "run", "score_images", "user_errors"]

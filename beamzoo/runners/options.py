"""Options for Beam pipelines, beamzoo's own and users' own: ``beam_options``.

    with beam_options(argv) as options, beam.Pipeline(options=options) as p:
        ...

For DirectRunner it names Beam's in-process runner (FnApiRunner) with one
worker thread per core, so Beam 2.68+ does not first try to download its
Prism runner. For FlinkRunner it adds the job server jar and Flink version
beamzoo installs, the environment for ``--flink_master`` (default
``[local]``: embedded Flink, workers in this process), starts the job server
JVM (stopped when the block ends) and hides the false alarm a LOOPBACK worker
prints when its job ends. Options you pass win.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading

from beamzoo.runners import flink
from beamzoo.runners.flink_fetch import MissingTool
from beamzoo.runners.job_server import JobServer
from beamzoo.runners.registry import UnknownRunner, is_beam, resolve

FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


class OptionError(ValueError):
    """A pipeline option that cannot work, with what to do instead."""


def runner_of(argv: list[str], default: str = "DirectRunner") -> str:
    for i, a in enumerate(argv):
        if a.startswith("--runner="):
            return a.split("=", 1)[1]
        if a == "--runner" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def _given(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _without_runner(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--runner":
            skip = True
        elif not a.startswith("--runner="):
            out.append(a)
    return out


def check_runner(name: str) -> str:
    """The runner's registered name (``beamzoo.runners.registry.RULE``); a misspelt one is refused,
    naming the runners there are."""
    try:
        return resolve(name)
    except UnknownRunner as exc:
        raise OptionError(str(exc)) from None


def with_direct_defaults(argv: list[str]) -> list[str]:
    """Beam's in-process runner with one worker thread per core, unless the user chose."""
    argv = _without_runner(argv) + [f"--runner={FN_API_RUNNER}"]
    if "--direct_num_workers" in _given(argv):
        return argv
    return argv + [f"--direct_num_workers={os.cpu_count() or 1}", "--direct_running_mode=multi_threading"]


def with_flink_defaults(argv: list[str]) -> list[str]:
    """Add what FlinkRunner needs (job server jar, Flink version, environment)
    for ``--flink_master`` (default ``[local]``), unless the user set it."""
    given = _given(argv)
    master = next((a.split("=", 1)[1] for a in argv if a.startswith("--flink_master=")), "[local]")
    try:
        extra = [a for a in flink.pipeline_args(master) if a.split("=", 1)[0] not in given]
    except MissingTool as exc:  # a first run builds the job server: Java and Maven must be there
        raise OptionError(str(exc)) from None
    return argv + extra


def _cancelled(exc: BaseException | None) -> bool:
    import grpc
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.CANCELLED


class _NotCancelled(logging.Filter):
    def filter(self, record):
        return not (record.exc_info and _cancelled(record.exc_info[1]))


def quiet_worker_shutdown() -> None:
    """Hide one false alarm: when a job on a portable runner ends, the runner
    cancels the in-process (LOOPBACK) worker's gRPC streams, and Beam's worker
    threads report that with a traceback, although the job succeeded. Only a
    CANCELLED gRPC error in a background thread is hidden; a job that really
    fails still raises from the pipeline."""
    previous = threading.excepthook
    if getattr(previous, "beamzoo_quiet", False):
        return

    def hook(args):
        if not _cancelled(args.exc_value):
            previous(args)

    hook.beamzoo_quiet = True
    threading.excepthook = hook
    logging.getLogger("apache_beam.runners.worker.data_plane").addFilter(_NotCancelled())


def flink_job_server(argv: list[str]):
    """The JobServer for a FlinkRunner run (start it with ``with``), or None where the user gave
    ``--job_endpoint`` (their own job server) or ``--flink_submit_uber_jar``."""
    from apache_beam.options.pipeline_options import (
        FlinkRunnerOptions, JobServerOptions, PipelineOptions, PortableOptions)
    from apache_beam.runners.portability.flink_runner import FlinkRunner
    options = PipelineOptions(argv)
    flink = options.view_as(FlinkRunnerOptions)
    if options.view_as(PortableOptions).job_endpoint or flink.flink_submit_uber_jar:
        return None
    jvm = options.view_as(JobServerOptions)
    java = jvm.job_server_java_launcher or "java"
    if shutil.which(java) is None:
        raise OptionError(f"FlinkRunner needs Java 11 or newer, and {java!r} is not on PATH: install a "
                          "JDK (e.g. apt-get install openjdk-17-jre-headless) or pass "
                          "--job_server_java_launcher=/path/to/java")
    return JobServer(flink.flink_job_server_jar, FlinkRunner.add_http_scheme(flink.flink_master),
                     jvm.job_server_jvm_properties or None, java)


@contextlib.contextmanager
def beam_options(argv: list[str] | None = None):
    """``PipelineOptions`` for ``argv`` (default ``sys.argv[1:]``), ready for DirectRunner or
    FlinkRunner; a FlinkRunner job server lives until the block ends."""
    from apache_beam.options.pipeline_options import PipelineOptions
    argv = list(sys.argv[1:] if argv is None else argv)
    runner = check_runner(runner_of(argv))
    if not is_beam(runner):
        raise OptionError(f"--runner={runner} runs beamzoo graphs without Beam; a Beam pipeline needs "
                          "DirectRunner or FlinkRunner")
    if runner == "DirectRunner":
        yield PipelineOptions(with_direct_defaults(argv))
        return
    if runner != "FlinkRunner":
        yield PipelineOptions(argv)
        return
    argv = with_flink_defaults(argv)
    server = flink_job_server(argv)
    quiet_worker_shutdown()
    with server or contextlib.nullcontext():
        if server is not None:
            argv = [*argv, f"--job_endpoint={server.wait()}"]
        yield PipelineOptions(argv)


def unknown_beam_options(argv: list[str]) -> list[str]:
    """What in ``argv`` no Beam options class takes: unknown options and stray
    arguments (Beam itself only warns)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    parser = {}
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # its "Discarding unparseable args": what is refused here, in one line
    try:
        PipelineOptions(argv).get_all_options(add_extra_args_fn=lambda p: parser.setdefault("p", p))
    finally:
        beam_log.setLevel(level)
    _, unknown = parser["p"].parse_known_args(argv)
    return unknown

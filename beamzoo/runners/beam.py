"""Running a graph on a Beam runner (DirectRunner, FlinkRunner, ...)."""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from beamzoo.core import Graph


def _runner(options):
    """DirectRunner means Beam's in-process Python runner (no Prism download)."""
    from apache_beam.options.pipeline_options import StandardOptions
    name = options.view_as(StandardOptions).runner
    if name in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return FnApiRunner()
    return None


def _given(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def with_direct_defaults(argv: list[str]) -> list[str]:
    """Beam's in-process runner with one worker thread per core, unless the user chose."""
    if "--direct_num_workers" in _given(argv):
        return argv
    return argv + [f"--direct_num_workers={os.cpu_count() or 1}", "--direct_running_mode=multi_threading"]


def with_flink_defaults(argv: list[str]) -> list[str]:
    """Add what FlinkRunner needs (job server jar, Flink version, environment)
    for ``--flink_master`` (default ``[local]``), unless the user set it."""
    from beamzoo.runners import flink
    given = _given(argv)
    master = next((a.split("=", 1)[1] for a in argv if a.startswith("--flink_master=")), "[local]")
    extra = [a for a in flink.pipeline_args(master) if a.split("=", 1)[0] not in given]
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

    from beamzoo.runners.job_server import JobServer
    options = PipelineOptions(argv)
    flink = options.view_as(FlinkRunnerOptions)
    if options.view_as(PortableOptions).job_endpoint or flink.flink_submit_uber_jar:
        return None
    jvm = options.view_as(JobServerOptions)
    return JobServer(flink.flink_job_server_jar, FlinkRunner.add_http_scheme(flink.flink_master),
                     jvm.job_server_jvm_properties or None, jvm.job_server_java_launcher)


def run(graph: Graph, output: str, argv: list[str], run: str) -> float | None:
    """Build the Beam pipeline for ``graph`` and run it to the end. Returns
    when (``time.time()``) the first prediction reached the writer, if any."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beamzoo.transforms.beam import ScoreToParquet

    server = None
    if "--runner=FlinkRunner" in argv:
        argv = with_flink_defaults(argv)
        server = flink_job_server(argv)
        quiet_worker_shutdown()
    elif "--runner=DirectRunner" in argv:
        argv = with_direct_defaults(argv)
    with server or contextlib.nullcontext():  # the JVM boots while the pipeline is built
        if server:
            argv = [*argv, f"--job_endpoint={server.endpoint}"]
        options = PipelineOptions(argv)
        pipeline = beam.Pipeline(runner=_runner(options), options=options)
        pipeline | "ScoreToParquet" >> ScoreToParquet(graph, output, run)
        if server:
            server.wait()
        result = pipeline.run()
        result.wait_until_finish()
        return first_output_time(result)  # asks the job server: before it stops


def first_output_time(result) -> float | None:
    """The smallest ``predictions_time_ms`` the writer recorded, in seconds."""
    from apache_beam.metrics.metric import MetricsFilter
    found = result.metrics().query(MetricsFilter().with_name("predictions_time_ms"))["distributions"]
    values = [r.committed or r.attempted for r in found]
    values = [v.min for v in values if v is not None and v.count]
    return min(values) / 1000 if values else None

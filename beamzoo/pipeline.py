"""The image-scoring graph and running any graph on any runner."""
from __future__ import annotations

import os
import time

from beamzoo.core import Graph, Source, dead_letters
from beamzoo.resume import check_output_dir, done_rows, run_id, with_keys
from beamzoo.runners import EdgeRunner, RunStats, is_edge
from beamzoo.runners.sinks import ParquetSink, count_rows, remove_stale_temporaries
from beamzoo.schemas import DEAD_LETTER_SCHEMA, SchemaMismatchError
from beamzoo.transforms.inference import ModelSignatureError, OnnxInference
from beamzoo.transforms.io import ReadFiles, list_files, printable, split_unencodable
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeResize, ResizeCrop
from beamzoo.zoo import ModelCard, ModelIntegrityError

# Mistakes a user can fix; command-line tools print these without a traceback.
UserError = (FileNotFoundError, FileExistsError, SchemaMismatchError, ModelSignatureError, ModelIntegrityError)


def score_images(pattern: str, card: ModelCard, k: int = 5, batch_size: int = 4,
                 max_pixels: int = 100_000_000, max_bytes: int = 256 << 20,
                 intra_op_threads: int = 1, reduced_decode: bool = True, shrink: str = "area") -> Graph:
    """files -> read -> decode and resize -> infer -> top-k, checked as it is built.

    The defaults suit a CPU: each worker thread runs the whole chain on its
    own small batch with a one-thread onnxruntime session, so decoding and
    inference keep every core busy without fighting over them.
    """
    resize = ResizeCrop.for_input(card.input, resize=card.resize, shrink=shrink)
    return (Graph(Source(pattern))
            | ReadFiles(max_bytes=max_bytes)
            | DecodeResize(resize, max_pixels=max_pixels, reduced_decode=reduced_decode)
            | OnnxInference(card, batch_size=batch_size, intra_op_threads=intra_op_threads)
            | TopK(card, k=k))


def run(graph: Graph, output: str, runner: str = "DirectRunner", beam_args: list[str] = (),
        edge: EdgeRunner | None = None, resume: bool = False) -> RunStats:
    """Run on the edge runner or, through Beam, on any Beam runner.

    Rows get resume keys; with ``resume`` the inputs already in ``output``
    are skipped. The counts returned are of everything in ``output``.
    """
    output = os.path.abspath(output)
    inputs = list_files(graph.source.pattern)
    if not inputs:
        raise FileNotFoundError(
            f"no files match {graph.source.pattern!r}; check the pattern, and quote it so "
            "the shell does not expand it (e.g. --input 'photos/**/*.jpg')")
    check_output_dir(output, resume)
    if resume and os.path.isdir(output):
        remove_stale_temporaries(output)
    keyed = with_keys(graph, output, resume)
    run_name = run_id()
    _refuse_unencodable(split_unencodable(inputs)[1], output, run_name, resume)
    start = time.perf_counter()
    first = None
    if is_edge(runner):
        first = (edge or EdgeRunner()).run(keyed, output, keyed.source.select(inputs), run_name).first_result_s
    else:
        from beamzoo.runners import beam
        wall = time.time()
        first_time = beam.run(keyed, output, [f"--runner={runner}", *beam_args], run_name)
        first = None if first_time is None else max(0.0, first_time - wall)
    return RunStats(len(inputs), count_rows(output, "predictions"), count_rows(output, "dead_letter"),
                    time.perf_counter() - start, first)


def _refuse_unencodable(paths: list[str], output: str, run_name: str, resume: bool) -> None:
    """Dead letters (stage "list") for file names that are not valid UTF-8."""
    shown = [printable(p) for p in paths]
    if resume and shown:
        _, unkeyed = done_rows(output)
        shown = [p for p in shown if p not in unkeyed]
    if not shown:
        return
    batch = Source.batch(shown)
    error = "file name is not valid UTF-8; rename the file to score it"
    with ParquetSink(output, "dead_letter", DEAD_LETTER_SCHEMA, f"{run_name}-list") as sink:
        sink.write(dead_letters(batch, list(range(len(shown))), "list", [error] * len(shown)))

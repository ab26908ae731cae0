"""The image-scoring graph and running any graph on any runner."""
from __future__ import annotations

from beamzoo.core import Graph, Source
from beamzoo.runners import EdgeRunner, RunStats, is_edge
from beamzoo.schemas import SchemaMismatchError
from beamzoo.transforms.inference import ModelSignatureError, OnnxInference
from beamzoo.transforms.io import ReadFiles, list_files
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop
from beamzoo.zoo import ModelCard, ModelIntegrityError

# Mistakes a user can fix; command-line tools print these without a traceback.
UserError = (FileNotFoundError, SchemaMismatchError, ModelSignatureError, ModelIntegrityError)


def score_images(pattern: str, card: ModelCard, k: int = 5, batch_size: int = 32,
                 max_pixels: int = 100_000_000, max_bytes: int = 256 << 20,
                 intra_op_threads: int = 0, reduced_decode: bool = True) -> Graph:
    """files -> read -> decode -> resize -> infer -> top-k, checked as it is built."""
    resize = ResizeCrop.for_input(card.input, resize=card.resize)
    return (Graph(Source(pattern))
            | ReadFiles(max_bytes=max_bytes)
            | DecodeImage(max_pixels=max_pixels, channels=card.input.channels,
                          min_side=resize.resize if reduced_decode else None)
            | resize
            | OnnxInference(card, batch_size=batch_size, intra_op_threads=intra_op_threads)
            | TopK(card, k=k))


def run(graph: Graph, output: str, runner: str = "DirectRunner", beam_args: list[str] = (),
        edge: EdgeRunner | None = None) -> RunStats:
    """Run on the edge runner or, through Beam, on any Beam runner."""
    paths = list_files(graph.source.pattern)
    if not paths:
        raise FileNotFoundError(
            f"no files match {graph.source.pattern!r}; check the pattern, and quote it so "
            "the shell does not expand it (e.g. --input 'photos/**/*.jpg')")
    if is_edge(runner):
        return (edge or EdgeRunner()).run(graph, output, paths)
    from beamzoo.runners import beam
    return beam.run(graph, output, [f"--runner={runner}", *beam_args], inputs=len(paths))

"""The OCR graph: image files -> one row per image with its ``text`` and ``lines``."""
from __future__ import annotations

import os

from beamzoo.graph import Composite, Graph, Stream
from beamzoo.transforms.flow import Collect
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.ocr import CropText, DetectText, RecognizeText, TextAngle, TextLines
from beamzoo.transforms.preprocess import DecodeImage


class ReadText(Composite):
    """file bytes -> ``text`` (lines in reading order, one a line) and ``lines``
    (text, score, box each) per image; ``children`` counts the regions found.

    A region that cannot be cropped or recognized is a dead letter of its own
    (with its image's ``parent_id``); an image without text gets an empty ``text``.
    """

    def __init__(self, max_pixels: int = 100_000_000, max_bytes: int = 256 << 20, min_score: float = 0.5,
                 rec_batch_size: int = 16, max_ratio: float = 256.0, intra_op_threads: int = 1):
        threads = {"intra_op_threads": intra_op_threads}
        self.read = ReadFiles(max_bytes=max_bytes)
        self.decode = DecodeImage(max_pixels=max_pixels, channels="BGR")
        self.detect = DetectText(**threads)
        self.crop = CropText(max_ratio=max_ratio)
        self.angle = TextAngle(**threads)
        self.recognize = RecognizeText(batch_size=rec_batch_size, **threads)
        self.collect = Collect(["text", "score", "box"], prefix="region_", id="collect_lines")
        self.lines = TextLines(min_score=min_score)

    def expand(self, stream: Stream) -> Stream:
        regions = stream | self.read | self.decode | self.detect
        read = regions.out | self.crop | self.angle | self.recognize
        return (read, regions.parents) | self.collect | self.lines


def ocr_images(pattern: str, output: str, **knobs) -> Graph:
    """files -> text -> ``output/predictions``, dead letters -> ``output/dead_letter``."""
    from beamzoo.pipeline import Pipeline
    from beamzoo.transforms.sinks import WriteParquet
    from beamzoo.transforms.sources import Files
    p = Pipeline()
    texts = p | Files(pattern) | ReadText(**knobs)
    texts | WriteParquet(os.path.join(output, "predictions"))
    p.dead_letters | WriteParquet(os.path.join(output, "dead_letter"), id="write_dead_letters")
    return p.graph

"""The OCR graph: image files -> one row per image with its ``text`` and ``lines``."""
from __future__ import annotations

import os

from beamzoo.core.graph import Composite, Graph, GraphBuilder, Stream
from beamzoo.core.knobs import pick
from beamzoo.transforms.flow import Collect
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.ocr import CropText, DetectText, RecognizeText, TextAngle, TextLines
from beamzoo.transforms.preprocess import DecodeImage
from beamzoo.transforms.sinks import WriteParquet
from beamzoo.transforms.sources import Files


class ReadText(Composite):
    """paths -> ``text`` (lines in reading order, one a line) and ``lines`` (text, score, box
    each) per image; ``children`` counts the regions found.

    A region that cannot be cropped or recognized is a dead letter of its own (with its
    image's ``parent_id``); an image without text gets an empty ``text``.
    """

    default_id = "ocr"
    knobs = {**pick(ReadFiles, "max_bytes"), **pick(DecodeImage, "max_pixels", "isolate", "time_limit", "memory_limit"),
             **pick(TextLines, "min_score"), **pick(RecognizeText, "batch_size", "intra_op_threads", "space_prob", "space_gap"),
             **pick(CropText, "max_ratio")}

    def expand(self, stream: Stream) -> Stream:
        p = self.params
        threads = {"intra_op_threads": p["intra_op_threads"]}
        if "data" not in stream.schema.names:
            stream = stream | ReadFiles(max_bytes=p["max_bytes"], time_limit=p["time_limit"])
        regions = stream | DecodeImage(max_pixels=p["max_pixels"], channels="BGR", isolate=p["isolate"],
                                       time_limit=p["time_limit"], memory_limit=p["memory_limit"]) \
            | DetectText(**threads)
        read = regions.out | CropText(max_ratio=p["max_ratio"]) | TextAngle(**threads) \
            | RecognizeText(batch_size=p["batch_size"], space_prob=p["space_prob"], space_gap=p["space_gap"], **threads)
        return (read, regions.parents) | Collect(["text", "score", "box"], prefix="region_", id="collect_lines") \
            | TextLines(min_score=p["min_score"])


def ocr_images(pattern: str, output: str, **knobs) -> Graph:
    """files -> text -> ``output/predictions``, dead letters -> ``output/dead_letter``
    (``knobs``: ``ReadText``'s)."""
    b = GraphBuilder()
    texts = b | Files(pattern) | ReadText(**knobs)
    texts | WriteParquet(os.path.join(output, "predictions"))
    b.dead_letters | WriteParquet(os.path.join(output, "dead_letter"), id="write_dead_letters")
    return b.graph


__all__ = ["ReadText", "ocr_images"]

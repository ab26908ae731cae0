"""Text detection, the one-to-many step of OCR: an image -> one child record per text region.

A child carries the region's ``box`` (four corners in the image's pixels:
top-left, top-right, bottom-right, bottom-left), the detector's ``det_score``,
and a ``patch``: the axis-aligned piece of the (fitted) image around the
region, with the region's corners in it (``quad``), for the crop step to
rectify. The ``parents`` port carries each image (without its pixels) and how
many regions it has: an image without text has none.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.schemas import PARENT_ID
from beamzoo.transforms.model import INTRA_OP_THREADS
from beamzoo.transforms.ocr import db
from beamzoo.transforms.ocr.crop import crop_size, turned
from beamzoo.transforms.ocr.geometry import detector_input, fit, order_quad
from beamzoo.transforms.ocr.images import QUAD, image_struct, pixels
from beamzoo.transforms.flow import Explode
from beamzoo.transforms.ocr.models import DETECTOR, UsesModel, model_knob
from beamzoo.transforms.preprocess import image_spec

MARGIN = 3  # pixels kept around a region's patch: what cubic interpolation reads at its edge
MAX_PATCH_BYTES = 512 << 20  # the patches of one image hold at most this (overlapping regions repeat pixels)


def aspect(quad) -> float:
    """Width over height of a region's upright crop (a tall one turned a quarter)."""
    w, h = crop_size(np.asarray(quad, np.float32))
    if w < 1 or h < 1:
        return 0.0
    return h / w if turned(w, h) else w / h


def pad_ratios(ratios: list[float], group: int) -> list[float]:
    """For each region, the widest aspect ratio of its group: its image's regions sorted
    by aspect, ``group`` at a time. That is the width it is recognized at, so a crop
    reads the same whatever other images share its batch (and as RapidOCR's engine,
    which batches an image's regions so, reads it)."""
    order = np.argsort(np.array(ratios, np.float64))
    out = [0.0] * len(ratios)
    for start in range(0, len(order), group):
        part = order[start:start + group]
        widest = max(ratios[i] for i in part)
        for i in part:
            out[i] = widest
    return out


class DetectText(UsesModel, Explode):
    """image (BGR) -> text regions, with PP-OCRv4 detection and DB post-processing."""

    name = "detect_text"
    default_id = "detect"
    knobs = {"model": model_knob(DETECTOR, "text detection"),
             "thresh": Knob(0.3, float, low=0, high=1, doc="a pixel is text above this probability"),
             "box_thresh": Knob(0.5, float, low=0, high=1, doc="keep a box whose mean probability is this"),
             "unclip_ratio": Knob(1.6, float, low=0, high=10, doc="how much a box is grown back"),
             "max_candidates": Knob(1000, int, low=1, doc="outlines looked at per image"),
             "limit_side": Knob(736, int, low=32, high=8192,
                                doc="the detector sees a short side of at least this (a very tall or flat "
                                    "image less: its long side is enlarged to 8 times this at most)"),
             "max_side": Knob(2000, int, low=32, high=8192, doc="larger images are shrunk to this long side first"),
             "pad_group": Knob(6, int, low=1, high=4096,
                               doc="regions of an image that share a recognition width"),
             "intra_op_threads": INTRA_OP_THREADS}
    INDEX = "region"
    task = "text-detection"

    def configure(self):
        self.requires = pa.schema([image_spec("BGR").field("image")])
        self.produces = pa.schema([PARENT_ID, pa.field("region", pa.int32()), pa.field("box", QUAD),
                                   pa.field("det_score", pa.float32()), image_spec("BGR").field("patch"),
                                   pa.field("quad", QUAD), pa.field("pad_ratio", pa.float64())])
        self.use_model()

    def regions(self, img: np.ndarray) -> list[dict]:
        """The text regions of one BGR image."""
        p = self.params
        fitted = fit(img, max_side=p["max_side"])
        x = detector_input(fitted.image, p["limit_side"])
        prob = self._session.run(None, {self._session.get_inputs()[0].name: x})[0][0, 0]
        h, w = fitted.image.shape[:2]
        found = []
        for quad, score in db.boxes(prob, h, w, p["thresh"], p["box_thresh"], p["unclip_ratio"],
                                    p["max_candidates"]):
            quad = order_quad(quad.astype(np.float32))
            quad[:, 0] = np.clip(quad[:, 0], 0, w - 1).astype(np.int32)
            quad[:, 1] = np.clip(quad[:, 1], 0, h - 1).astype(np.int32)
            if int(np.linalg.norm(quad[0] - quad[1])) <= 3 or int(np.linalg.norm(quad[0] - quad[3])) <= 3:
                continue  # a sliver
            x0, y0 = (max(0, int(v) - MARGIN) for v in quad.min(axis=0))
            x1, y1 = (min(int(v) + MARGIN + 1, side) for v, side in zip(quad.max(axis=0), (w, h)))
            found.append((quad, score, x0, y0, x1, y1))
        size = sum((x1 - x0) * (y1 - y0) * 3 for *_, x0, y0, x1, y1 in found)
        if size > MAX_PATCH_BYTES:  # checked before a pixel is copied
            raise ValueError(f"its {len(found)} text regions overlap so much that their patches would hold "
                             f"{size >> 20} MiB, over the limit of {MAX_PATCH_BYTES >> 20} MiB")
        out = [{"box": fitted.to_original(quad).tolist(), "det_score": score,
                "patch": image_struct(fitted.image[y0:y1, x0:x1]),
                "quad": (quad - np.array([x0, y0], np.float32)).tolist()}
               for quad, score, x0, y0, x1, y1 in found]
        ratios = [aspect(r["quad"]) for r in out]
        for r, pad in zip(out, pad_ratios(ratios, p["pad_group"])):
            r["pad_ratio"] = pad
        return out

    def children(self, image: dict) -> list[dict]:
        return self.regions(pixels(image))

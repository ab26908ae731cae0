"""Crop and rectify a text region: its four corners are warped to an upright
rectangle (bicubic), and a region much taller than wide is turned a quarter
(counter-clockwise) so that its text runs left to right."""
from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.op import RowOperator
from beamzoo.transforms.ocr.images import QUAD, image_struct, pixels
from beamzoo.transforms.preprocess import image_spec


def crop_size(quad: np.ndarray) -> tuple[int, int]:
    """(width, height) of the upright crop of a region: its longer opposite sides."""
    width = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    height = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    return width, height


def turned(width: int, height: int) -> bool:
    """Whether a crop is tall enough to be read turned a quarter."""
    return height / width >= 1.5


def rectify(img: np.ndarray, quad: np.ndarray, max_ratio: float = 256.0) -> np.ndarray:
    """The region with corners ``quad`` (tl, tr, br, bl) of ``img`` as an upright crop."""
    quad = np.asarray(quad, np.float32)
    if quad.shape != (4, 2) or not np.isfinite(quad).all():
        raise ValueError(f"a region needs four finite corners, got {quad.tolist()}")
    width, height = crop_size(quad)
    if width < 1 or height < 1:
        raise ValueError(f"the region {quad.tolist()} has no area ({width}x{height} pixels)")
    if max(width, height) / min(width, height) > max_ratio:
        raise ValueError(f"the region is {max(width, height)}x{min(width, height)} pixels, longer than "
                         f"max_ratio={max_ratio:g} times its height; raise max_ratio to read it")
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    warp = cv2.getPerspectiveTransform(quad, target)
    out = cv2.warpPerspective(img, warp, (width, height), flags=cv2.INTER_CUBIC,
                              borderMode=cv2.BORDER_REPLICATE)
    return np.rot90(out) if turned(width, height) else out


class CropText(RowOperator):
    """patch + quad -> ``image``: the region rectified. A region that cannot be cut
    (no area, corners that are not numbers, too long and thin) is a dead letter."""

    name = "crop_text"
    default_id = "crop"
    knobs = {"max_ratio": Knob(256.0, float, low=1, doc="refuse regions longer than this times their height")}
    requires = pa.schema([image_spec("BGR").field("patch"), pa.field("quad", QUAD)])
    produces = pa.schema([image_spec("BGR").field("image")])
    consumes = ("patch", "quad")

    def process_row(self, row):
        return {"image": image_struct(rectify(pixels(row["patch"]), row["quad"], self.params["max_ratio"]))}

"""Text direction: a crop the angle classifier finds upside down (confidently) is
turned half a circle before recognition."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.transforms.model import INTRA_OP_THREADS
from beamzoo.transforms.ocr.batched import BatchedModel
from beamzoo.transforms.ocr.images import image_struct, pixels
from beamzoo.transforms.ocr.models import ANGLE, model_knob
from beamzoo.transforms.preprocess import image_spec

HEIGHT, WIDTH = 48, 192  # the classifier's input
ANGLES = (0, 180)  # its classes


def classifier_input(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """A crop as a CHW float32 at ``height``, its width scaled alike (at most ``width``),
    values -1..1, padded on the right with zeros to ``width``."""
    h, w = img.shape[:2]
    new_w = min(width, int(math.ceil(height * w / h)))
    x = cv2.resize(img, (new_w, height)).astype(np.float32)
    x *= np.float32(1 / 127.5)
    x -= np.float32(1)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = x.transpose(2, 0, 1)
    return out


class TextAngle(BatchedModel):
    """image -> image (turned if upside down), ``angle`` (the degrees it was turned: 0 or 180)
    and ``angle_score`` (the classifier's confidence in its class)."""

    name = "text_angle"
    default_id = "angle"
    task = "text-direction"
    knobs = {"model": model_knob(ANGLE, "angle classifier"),
             "thresh": Knob(0.9, float, low=0, high=1, doc="turn a crop only when this sure"),
             "batch_size": Knob(6, int, low=1, high=4096, results=False, doc="crops per classifier call"),
             "intra_op_threads": INTRA_OP_THREADS}
    requires = pa.schema([image_spec("BGR").field("image")])
    produces = pa.schema([image_spec("BGR").field("image"), pa.field("angle", pa.int32()),
                          pa.field("angle_score", pa.float32())])
    consumes = ("image",)

    def prepare(self, row):
        img = pixels(row["image"])
        return img, classifier_input(img, HEIGHT, WIDTH)

    def run(self, prepared):
        x = np.stack([p[1] for p in prepared])
        probs = self._session.run(None, {self._session.get_inputs()[0].name: x})[0]
        out = []
        for (img, _), p in zip(prepared, probs):
            k = int(np.argmax(p))
            turn = ANGLES[k] == 180 and p[k] > self.params["thresh"]
            out.append({"image": image_struct(cv2.rotate(img, cv2.ROTATE_180) if turn else img),
                        "angle": 180 if turn else 0, "angle_score": float(p[k])})
        return out

"""Text recognition with PP-OCRv4: crops of any width, batched across regions of
many images. Crops are sorted by aspect ratio so that a batch's crops are alike
in width; crops of one input width run together."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.transforms.ocr import ctc
from beamzoo.transforms.model import INTRA_OP_THREADS
from beamzoo.transforms.ocr.batched import BatchedModel
from beamzoo.transforms.ocr.images import pixels
from beamzoo.transforms.ocr.models import RECOGNIZER, model_knob, characters
from beamzoo.transforms.preprocess import image_spec

HEIGHT, MIN_WIDTH = 48, 320  # the recognizer's input height, and the narrowest batch
MAX_RATIO = 256  # the widest input, in heights: a wider crop is squeezed to it (CropText refuses such by default)


class RecognizeText(BatchedModel):
    """image -> ``text`` and ``score`` (the mean confidence of its characters).

    A crop is scaled to 48 pixels high and padded on the right to the width its
    ``pad_ratio`` gives (at least 320), so that it reads the same in any batch.
    Narrow spaces the model reads as nothing are put back from its space class's
    probability and the characters' positions (``beamzoo.transforms.ocr.ctc``)."""

    name = "recognize_text"
    default_id = "recognize"
    task = "text-recognition"
    knobs = {"model": model_knob(RECOGNIZER, "text recognition"),
             "space_prob": Knob(ctc.SPACE_PROB, float, low=0, high=1,
                                doc="insert a space between characters where the model's space probability "
                                    "reaches this (1: insert none)"),
             "space_gap": Knob(ctc.SPACE_GAP, float, low=1,
                               doc="also insert one where that probability reaches a quarter of space_prob "
                                   "and the characters are this many times the line's median distance apart"),
             "batch_size": Knob(16, int, low=1, high=4096, results=False, doc="regions per recognition call"),
             "intra_op_threads": INTRA_OP_THREADS}
    requires = pa.schema([image_spec("BGR").field("image"), pa.field("pad_ratio", pa.float64())])
    produces = pa.schema([pa.field("text", pa.string()), pa.field("score", pa.float32())])
    consumes = ("image", "pad_ratio")

    def setup(self):
        super().setup()
        self._chars = characters(self._session)

    def prepare(self, row):
        img = pixels(row["image"])
        h, w = img.shape[:2]
        if h < 1 or w < 1:
            raise ValueError(f"an empty crop ({w}x{h})")
        ratio = row["pad_ratio"] if row["pad_ratio"] is not None else w / h
        return img, int(HEIGHT * min(max(MIN_WIDTH / HEIGHT, ratio), MAX_RATIO))

    def batches(self, prepared):
        """Crops of the same input width together, up to ``batch_size``, narrow ones first."""
        order = sorted(range(len(prepared)), key=lambda i: (prepared[i][1], prepared[i][0].shape[1]
                                                           / prepared[i][0].shape[0]))
        out: list[list[int]] = []
        for i in order:
            if out and len(out[-1]) < self.params["batch_size"] and prepared[out[-1][0]][1] == prepared[i][1]:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def run(self, prepared):
        width = prepared[0][1]
        x = np.zeros((len(prepared), 3, HEIGHT, width), np.float32)
        for k, (im, _) in enumerate(prepared):
            new_w = min(width, int(math.ceil(HEIGHT * im.shape[1] / im.shape[0])))
            r = cv2.resize(im, (new_w, HEIGHT)).astype(np.float32)
            r *= np.float32(1 / 127.5)
            r -= np.float32(1)
            x[k, :, :, :new_w] = r.transpose(2, 0, 1)
        probs = self._session.run(None, {self._session.get_inputs()[0].name: x})[0]
        return [{"text": t, "score": s} for t, s in ctc.decode(
            probs, self._chars, self.params["space_prob"], self.params["space_gap"])]

"""Decoding and resizing images as graph steps (the pixels come from ``beamzoo.imaging``)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob, pick
from beamzoo.core.op import PIECE_BYTES, RowOperator
from beamzoo.core.schemas import TensorSpec, image_array, tensor_array
from beamzoo.imaging import SHRINK_FILTERS, decode, decode_resized, read_header, resize_crop, scaled
from beamzoo.transforms import isolated

CHANNELS = ("RGB", "BGR")


def image_spec(channels: str = "RGB") -> TensorSpec:
    return TensorSpec("uint8", (None, None, 3), layout="NHWC", channels=channels, value_range=(0, 255))


MAX_PIXELS = Knob(100_000_000, int, low=1, high=(2 << 30) // 3,  # a decoded image fits one Arrow binary value
                  doc="refuse images with more pixels than this (decompression bombs), from their header, "
                      "before any pixel is decoded")


class DecodeImage(RowOperator):
    """data (file bytes) -> image (HxWx3 uint8).

    ``max_pixels`` refuses decompression bombs; ``min_side`` lets big JPEGs decode at
    reduced size when a later step shrinks them anyway. Decoding runs under the
    per-input limits of ``beamzoo.transforms.isolated`` unless ``isolate`` is off.
    A batch is decoded in pieces of at most ``batch_bytes`` of pixels (from the
    images' headers; a bigger image is a piece alone), one piece at a time, so that
    the pixels in memory are bounded in bytes, not in files.
    """

    name = "decode_image"
    default_id = "decode"
    knobs = {"max_pixels": MAX_PIXELS,
             "min_side": Knob(None, int, low=1, doc="decode JPEGs at 1/2, 1/4, 1/8 scale, not below this"),
             "channels": Knob("RGB", str, choices=CHANNELS, doc="channel order of the decoded image"),
             "batch_bytes": Knob(PIECE_BYTES, int, low=1, high=PIECE_BYTES, results=False, unit="bytes",
                                 doc="bytes of pixels a batch holds at most (a larger image goes alone)"),
             **isolated.KNOBS}
    requires = pa.schema([pa.field("data", pa.binary())])
    consumes = ("data",)

    def configure(self):
        self.produces = pa.schema([image_spec(self.params["channels"]).field("image")])

    def process_pieces(self, batch):
        self.bind()
        rows, budget = self.rows(batch), self.params["batch_bytes"]
        start, size = 0, 0
        for i, row in enumerate(rows):
            n = _pixel_bytes(row["data"])
            if i > start and size + n > budget:
                yield self.result(batch.slice(start, i - start), self.process_rows(rows[start:i]))
                start, size = i, 0
            size += n
        yield self.result(batch.slice(start), self.process_rows(rows[start:]))

    def setup(self):
        p = self.params
        if p["isolate"]:  # the workers start now, not with the first input
            isolated.pool(p["max_pixels"], p["time_limit"], p["memory_limit"], self.ctx)

    def fuse(self, reader):
        """With the resize that reads it: one DecodeResize, the same pixels, where the resize
        needs no more than this decode gives."""
        if not isinstance(reader, ResizeCrop):
            return None
        d = self.params
        if d["channels"] != reader.channels or d["min_side"] not in (None, reader.resize):
            return None
        scope, _, local = reader.id.rpartition("/")
        return DecodeResize(**reader.params, max_pixels=d["max_pixels"], reduced_decode=d["min_side"] is not None,
                            report_as=[self.id, reader.id], **{k: d[k] for k in isolated.KNOBS},
                            id=f"{self.id}+{local}" if scope == self.id.rpartition("/")[0] else
                            f"{self.id}+{reader.id}")

    def process_rows(self, rows):
        p = self.params
        if not p["isolate"]:
            return super().process_rows(rows)
        job = (p["max_pixels"], p["min_side"], p["channels"], None)
        return [{"image": r} if isinstance(r, np.ndarray) else r
                for r in isolated.run(self, [row["data"] for row in rows], job, (self.id, self.id))]

    def process_row(self, row):
        p = self.params
        return {"image": decode(row["data"], p["max_pixels"], p["min_side"], p["channels"])}

    def to_array(self, field, values):
        return image_array(values)  # the decoded arrays, not Python bytes of them


def _pixel_bytes(data: bytes) -> int:
    """The bytes ``data`` decodes to at most, from its header (0 for what will not decode)."""
    try:
        _, w, h = read_header(data)
    except Exception:  # noqa: BLE001 - decoding gives the reason
        return 0
    return w * h * 3


RESIZE_KNOBS = {
    "resize": Knob(256, int, low=1, doc="short side after resizing"),
    "crop": Knob(224, int, low=1, doc="side of the centre crop"),
    "layout": Knob("NCHW", str, choices=("NCHW", "NHWC"), doc="layout of the pixels"),
    "channels": Knob("RGB", str, choices=CHANNELS, doc="channel order of the pixels"),
    "value_range": Knob([-1.0, 1.0], list, doc="(low, high) the pixels 0..255 are scaled to",
                        convert=lambda v: [float(x) for x in v]),
    "shrink": Knob("area", str, choices=tuple(SHRINK_FILTERS), tune=tuple(SHRINK_FILTERS),
                   doc="resize filter when shrinking: area (an exact area average) or linear (bilinear: a "
                       "seventh of the resize cost, a little more aliasing)"),
}


class _Pixels:
    """What ResizeCrop and DecodeResize share: the pixels' contract from the resize knobs."""

    def _pixels_spec(self):
        p = self.params
        if len(p["value_range"]) != 2:
            raise ValueError(f"value_range must be (low, high), got {p['value_range']!r}")
        self.resize, self.crop, self.layout, self.shrink = p["resize"], p["crop"], p["layout"], p["shrink"]
        self.channels, self.value_range = p["channels"], tuple(p["value_range"])
        shape = (3, self.crop, self.crop) if self.layout == "NCHW" else (self.crop, self.crop, 3)
        self.spec = TensorSpec("float32", shape, self.layout, self.channels, self.value_range)
        self.produces = pa.schema([self.spec.field("pixels")])

    def to_pixels(self, crop: np.ndarray) -> np.ndarray:
        """A cropped HxWx3 uint8 image, scaled to the value range and laid out."""
        return scaled(crop, self.layout, self.value_range)

    def to_array(self, field, values):
        stacked = np.stack(values) if values else np.empty((0, *self.spec.shape), np.float32)
        return tensor_array(stacked)


class ResizeCrop(_Pixels, RowOperator):
    """image -> pixels: resize, centre crop, scale to ``value_range``, lay out.

    Use ``ResizeCrop.for_input(spec)`` to match a model's declared input.
    """

    name = "resize_crop"
    default_id = "resize"
    knobs = RESIZE_KNOBS
    consumes = ("image",)

    def configure(self):
        self._pixels_spec()
        self.requires = pa.schema([image_spec(self.channels).field("image")])

    @classmethod
    def for_input(cls, spec: TensorSpec, resize: int | None = None, **kw) -> ResizeCrop:
        crop = spec.shape[1] if spec.layout == "NCHW" else spec.shape[0]
        return cls(resize=resize or round(crop * 256 / 224), crop=crop, layout=spec.layout,
                   channels=spec.channels, value_range=spec.value_range, **kw)

    def process_row(self, row):
        im = row["image"]
        img = np.frombuffer(im["data"], np.uint8).reshape(im["height"], im["width"], im["channels"])
        return {"pixels": self.to_pixels(resize_crop(img, self.resize, self.crop, self.shrink))}


class DecodeResize(_Pixels, RowOperator):
    """data (file bytes) -> pixels: DecodeImage and ResizeCrop in one step.

    The compiler puts it in place of ``DecodeImage(min_side=R or None) | ResizeCrop(resize=R)``
    (``DecodeImage.fuse``): the same pixels, without moving each decoded photo through
    Arrow (the channel order is changed on the crop, not the photo).
    """

    name = "decode_resize"
    default_id = "decode_resize"
    knobs = {**RESIZE_KNOBS, **pick(DecodeImage, "max_pixels"),
             "reduced_decode": Knob(True, bool, doc="decode big JPEGs at reduced size (libjpeg's DCT scaling), "
                                                    "never below the resize"),
             "report_as": Knob(None, list, results=False,
                               doc="[decode id, resize id]: the steps failures are reported as"),
             **isolated.KNOBS}
    requires = pa.schema([pa.field("data", pa.binary())])
    consumes = ("data",)

    def configure(self):
        self._pixels_spec()
        self.stage_ids = tuple(self.params["report_as"] or (self.id, self.id))  # failures in decoding, resizing

    setup = DecodeImage.setup

    def _job(self):
        p = self.params
        return (p["max_pixels"], self.resize if p["reduced_decode"] else None, self.channels,
                (self.resize, self.crop, self.shrink))

    def process_rows(self, rows):
        if not self.params["isolate"]:
            return super().process_rows(rows)
        return [{"pixels": self.to_pixels(out)} if isinstance(out, np.ndarray) else out
                for out in isolated.run(self, [row["data"] for row in rows], self._job(), self.stage_ids)]

    def process_row(self, row):
        max_pixels, min_side, channels, (resize, crop, shrink) = self._job()
        try:
            img = decode_resized(row["data"], max_pixels, min_side, resize, crop, shrink, channels)
        except Exception as exc:
            exc.stage = self.stage_ids[getattr(exc, "part", 0)]
            raise
        return {"pixels": self.to_pixels(img)}


__all__ = ["CHANNELS", "DecodeImage", "DecodeResize", "MAX_PIXELS", "RESIZE_KNOBS", "ResizeCrop", "image_spec"]

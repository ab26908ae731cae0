"""Image decoding and resizing with OpenCV.

Pillow reads only the header (format, size, frames) so that a decompression
bomb is refused before any pixel is decoded; OpenCV decodes and resizes.
"""
from __future__ import annotations

import io
import math
import struct

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from beamzoo.core import Hints, RowOperator
from beamzoo.schemas import TensorSpec, tensor_array

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
SHRINK_FILTERS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


def image_spec(channels: str = "RGB") -> TensorSpec:
    return TensorSpec("uint8", (None, None, 3), layout="NHWC", channels=channels, value_range=(0, 255))


def read_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from Pillow's format plugins, reading the header only.

    Not ``Image.open``: its own bomb check (a process-wide setting) would
    override the caller's ``max_pixels``.
    """
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(data[:16]) is not True:
            continue
        try:
            with factory(io.BytesIO(data), "") as im:
                return im.format, im.size[0], im.size[1]
        except Exception:  # noqa: BLE001 - this plugin cannot read it; try the next
            continue
    raise ValueError(f"not an image in a known format (starts with {data[:16]!r})")


def sniff(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height); raises on a non-image or a decompression bomb."""
    fmt, w, h = read_header(data)
    if w * h > max_pixels:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(raise max_pixels to accept it)")
    if w == 0 or h == 0:
        raise ValueError(f"image has no pixels ({w}x{h})")
    return fmt, w, h


def check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunk declares more bytes than the file holds.

    OpenCV allocates what a chunk declares before reading it: one flipped
    byte in a 3 KB file can make it reserve 1.8 GiB.
    """
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        left = len(data) - pos - 12
        if length > left:
            raise ValueError(f"PNG is corrupt or truncated: chunk {kind.decode('latin-1')!r} "
                             f"declares {length} bytes, only {max(left, 0)} follow")
        if kind == b"IEND":
            return
        pos += length + 12


def decode(data: bytes, max_pixels: int, min_side: int | None = None, channels: str = "RGB") -> np.ndarray:
    """Bytes to an HxWx3 uint8 array, EXIF orientation applied.

    JPEGs much larger than ``min_side`` are decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling), never below ``min_side`` on the short side.
    """
    fmt, w, h = sniff(data, max_pixels)
    if fmt == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG":
        check_png_chunks(data)
    flags = cv2.IMREAD_COLOR
    if fmt == "JPEG" and min_side:
        factor = max((f for f in _REDUCED if min(w, h) // f >= min_side), default=1)
        flags = _REDUCED.get(factor, cv2.IMREAD_COLOR)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError(f"could not decode this {fmt} image (corrupt or truncated)")
    if channels == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


class DecodeImage(RowOperator):
    """data (file bytes) -> image (HxWx3 uint8).

    ``max_pixels`` refuses decompression bombs; ``min_side`` lets big JPEGs
    decode at reduced size when a later step shrinks them anyway.
    """

    requires = pa.schema([pa.field("data", pa.binary())])
    consumes = ("data",)

    def __init__(self, max_pixels: int = 100_000_000, min_side: int | None = None,
                 channels: str = "RGB", name: str = "decode", hints: Hints | None = None):
        super().__init__(name, hints)
        self.max_pixels, self.min_side, self.channels = max_pixels, min_side, channels
        self.produces = pa.schema([image_spec(channels).field("image")])

    def process_row(self, row):
        img = decode(row["data"], self.max_pixels, self.min_side, self.channels)
        h, w, c = img.shape
        return {"image": {"data": img.tobytes(), "height": h, "width": w, "channels": c}}

    def fingerprint(self):
        return {**super().fingerprint(), "max_pixels": self.max_pixels,
                "min_side": self.min_side, "channels": self.channels}


def resize_crop(img: np.ndarray, resize: int, crop: int, shrink: str = "area") -> np.ndarray:
    """Short side to ``resize`` (``shrink`` filter when shrinking, bilinear when
    enlarging), then a centre crop.

    With an extreme aspect ratio (say 1 x 10000) the resized image would be
    enormous, so the long side is first cut to what the crop keeps.
    """
    h, w = img.shape[:2]
    scale = resize / min(h, w)
    keep = math.ceil(crop / scale) + 2  # source pixels the crop needs, and a margin for the filter
    if max(h, w) * scale > 4 * resize and max(h, w) > keep:
        if h > w:
            img = img[(h - keep) // 2:(h - keep) // 2 + keep]
        else:
            img = img[:, (w - keep) // 2:(w - keep) // 2 + keep]
        h, w = img.shape[:2]
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    interp = SHRINK_FILTERS[shrink] if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return img[top:top + crop, left:left + crop]


class ResizeCrop(RowOperator):
    """image -> pixels: resize, centre crop, scale to ``value_range``, lay out.

    Use ``ResizeCrop.for_input(spec)`` to match a model's declared input.
    ``shrink``: the filter when shrinking, ``"area"`` (OpenCV's INTER_AREA,
    an exact area average) or ``"linear"`` (bilinear: the resize costs about
    a seventh as much, and aliases a little more).
    """

    consumes = ("image",)

    def __init__(self, resize: int = 256, crop: int = 224, layout: str = "NCHW",
                 channels: str = "RGB", value_range: tuple[float, float] = (-1.0, 1.0),
                 shrink: str = "area", name: str = "resize", hints: Hints | None = None):
        super().__init__(name, hints)
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        if shrink not in SHRINK_FILTERS:
            raise ValueError(f"shrink must be one of {sorted(SHRINK_FILTERS)}, got {shrink!r}")
        self.resize, self.crop, self.layout, self.shrink = resize, crop, layout, shrink
        self.channels, self.value_range = channels, tuple(value_range)
        shape = (3, crop, crop) if layout == "NCHW" else (crop, crop, 3)
        self.spec = TensorSpec("float32", shape, layout, channels, self.value_range)
        self.requires = pa.schema([image_spec(channels).field("image")])
        self.produces = pa.schema([self.spec.field("pixels")])
        lo, hi = self.value_range
        self._scale, self._offset = np.float32((hi - lo) / 255.0), np.float32(lo)

    @classmethod
    def for_input(cls, spec: TensorSpec, resize: int | None = None, **kw) -> ResizeCrop:
        crop = spec.shape[1] if spec.layout == "NCHW" else spec.shape[0]
        return cls(resize=resize or round(crop * 256 / 224), crop=crop, layout=spec.layout,
                   channels=spec.channels, value_range=spec.value_range, **kw)

    def process_row(self, row):
        im = row["image"]
        img = np.frombuffer(im["data"], np.uint8).reshape(im["height"], im["width"], im["channels"])
        return {"pixels": self.to_pixels(resize_crop(img, self.resize, self.crop, self.shrink))}

    def to_pixels(self, crop: np.ndarray) -> np.ndarray:
        """A cropped HxWx3 uint8 image, scaled to the value range and laid out."""
        out = crop.astype(np.float32)
        out *= self._scale
        out += self._offset
        if self.layout == "NCHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    def to_array(self, field, values):
        stacked = np.stack(values) if values else np.empty((0, *self.spec.shape), np.float32)
        return tensor_array(stacked)

    def fingerprint(self):
        return {**super().fingerprint(), "resize": self.resize, "crop": self.crop, "shrink": self.shrink,
                "layout": self.layout, "channels": self.channels, "value_range": self.value_range}


class DecodeResize(RowOperator):
    """data (file bytes) -> pixels: DecodeImage and ResizeCrop in one step.

    The same pixels as the two steps, without moving each decoded image
    through Arrow: the channel order is changed on the crop, not the photo.
    """

    requires = pa.schema([pa.field("data", pa.binary())])
    consumes = ("data",)

    def __init__(self, resize: ResizeCrop, max_pixels: int = 100_000_000, reduced_decode: bool = True,
                 name: str = "decode", hints: Hints | None = None):
        super().__init__(name, hints)
        self.resize, self.max_pixels, self.reduced_decode = resize, max_pixels, reduced_decode
        self.produces = resize.produces

    def process_row(self, row):
        r = self.resize
        img = decode(row["data"], self.max_pixels, r.resize if self.reduced_decode else None, "BGR")
        img = resize_crop(img, r.resize, r.crop, r.shrink)
        if r.channels == "RGB":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return {"pixels": r.to_pixels(img)}

    def to_array(self, field, values):
        return self.resize.to_array(field, values)

    def fingerprint(self):
        return {**super().fingerprint(), "max_pixels": self.max_pixels,
                "reduced_decode": self.reduced_decode, "resize": self.resize.fingerprint()}

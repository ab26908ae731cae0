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

from beamzoo.core import Knob, RowOperator, register
from beamzoo.schemas import TensorSpec, tensor_array
from beamzoo.transforms import isolated
from beamzoo.transforms.jpeg import jpeg_end

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
SHRINK_FILTERS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


def image_spec(channels: str = "RGB") -> TensorSpec:
    return TensorSpec("uint8", (None, None, 3), layout="NHWC", channels=channels, value_range=(0, 255))


# The formats beamzoo decodes, by the magic bytes they start with; nothing else reaches a decoder.
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")


def magic_format(data: bytes) -> str | None:
    """The format ``data``'s first bytes name, of those beamzoo decodes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def known_format(data: bytes) -> str:
    """``magic_format(data)``; raises ValueError for bytes in no format beamzoo reads."""
    fmt = magic_format(data)
    if fmt is None:
        raise ValueError(f"not an image in a known format: beamzoo reads {', '.join(FORMATS)} "
                         f"(starts with {bytes(data[:16])!r})")
    return fmt


def read_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height), the header read by Pillow's plugin for the format the
    magic bytes name (and no other, so that the two cannot disagree on what the file is).

    Not ``Image.open``: its own bomb check (a process-wide setting) would
    override the caller's ``max_pixels``.
    """
    fmt = known_format(data)
    Image.init()
    factory, _ = Image.OPEN[fmt]
    try:
        with factory(io.BytesIO(data), "") as im:
            return fmt, im.size[0], im.size[1]
    except Exception as exc:  # noqa: BLE001 - Pillow's reason, as the dead letter's
        raise ValueError(f"corrupt {fmt} header ({type(exc).__name__}: {exc})") from None


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


def _jpeg_truncated(data: bytes) -> bool:
    """Whether the JPEG's marker structure ends before its end-of-image marker. Bytes
    after that marker (phones append whole videos) do not matter; a structure libjpeg
    would still read (junk between segments) is left to the decoder."""
    try:
        return jpeg_end(data) is None
    except ValueError:
        return False


def decode(data: bytes, max_pixels: int, min_side: int | None = None, channels: str = "RGB") -> np.ndarray:
    """Bytes to an HxWx3 uint8 array, EXIF orientation applied.

    JPEGs much larger than ``min_side`` are decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling), never below ``min_side`` on the short side.
    """
    fmt, w, h = sniff(data, max_pixels)
    if fmt == "JPEG" and _jpeg_truncated(data):
        raise ValueError("truncated JPEG (the data ends before its end-of-image marker)")
    if fmt == "PNG":
        check_png_chunks(data)
    flags, factor = cv2.IMREAD_COLOR, 1
    if fmt == "JPEG" and min_side:
        factor = max((f for f in _REDUCED if min(w, h) // f >= min_side), default=1)
        flags = _REDUCED.get(factor, cv2.IMREAD_COLOR)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError(f"could not decode this {fmt} image (corrupt or truncated)")
    if img.shape[0] * img.shape[1] > -(-w // factor) * -(-h // factor):
        raise ValueError(f"this {fmt} decoded to {img.shape[1]}x{img.shape[0]}, more pixels than its header's "
                         f"{w}x{h}: the file is not what its header says")
    if channels == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


_CHANNELS = ("RGB", "BGR")


@register("decode_image")
class DecodeImage(RowOperator):
    """data (file bytes) -> image (HxWx3 uint8).

    ``max_pixels`` refuses decompression bombs; ``min_side`` lets big JPEGs
    decode at reduced size when a later step shrinks them anyway.
    """

    default_id = "decode"
    knobs = {"max_pixels": Knob(100_000_000, int, low=1, doc="refuse images with more pixels"),
             "min_side": Knob(None, int, low=1, doc="decode JPEGs at 1/2, 1/4, 1/8 scale, not below this"),
             "channels": Knob("RGB", str, choices=_CHANNELS), **isolated.KNOBS}
    requires = pa.schema([pa.field("data", pa.binary())])
    consumes = ("data",)

    def __init__(self, max_pixels: int = 100_000_000, min_side: int | None = None,
                 channels: str = "RGB", id: str | None = None, **limits):
        """``limits``: ``isolate``, ``time_limit``, ``memory_limit`` (``beamzoo.transforms.isolated``)."""
        super().__init__(id, max_pixels=max_pixels, min_side=min_side, channels=channels, **limits)

    def configure(self):
        self.produces = pa.schema([image_spec(self.params["channels"]).field("image")])

    def setup(self):
        p = self.params
        if p["isolate"]:  # the workers start now, not with the first input
            isolated.pool(p["max_pixels"], p["time_limit"], p["memory_limit"])

    def process_rows(self, rows):
        p = self.params
        if not p["isolate"]:
            return super().process_rows(rows)
        job = (p["max_pixels"], p["min_side"], p["channels"], None)
        return [_image(r) if isinstance(r, np.ndarray) else r
                for r in isolated.run(self, [row["data"] for row in rows], job, (self.id, self.id))]

    def process_row(self, row):
        p = self.params
        return _image(decode(row["data"], p["max_pixels"], p["min_side"], p["channels"]))


def _image(img: np.ndarray) -> dict:
    h, w, c = img.shape
    return {"image": {"data": img.tobytes(), "height": h, "width": w, "channels": c}}


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


_RESIZE_KNOBS = {
    "resize": Knob(256, int, low=1, doc="short side after resizing"),
    "crop": Knob(224, int, low=1, doc="side of the centre crop"),
    "layout": Knob("NCHW", str, choices=("NCHW", "NHWC")),
    "channels": Knob("RGB", str, choices=_CHANNELS),
    "value_range": Knob([-1.0, 1.0], list, doc="(low, high) the pixels are scaled to"),
    "shrink": Knob("area", str, choices=tuple(SHRINK_FILTERS), doc="resize filter when shrinking"),
}


@register("resize_crop")
class ResizeCrop(RowOperator):
    """image -> pixels: resize, centre crop, scale to ``value_range``, lay out.

    Use ``ResizeCrop.for_input(spec)`` to match a model's declared input.
    ``shrink``: the filter when shrinking, ``"area"`` (OpenCV's INTER_AREA,
    an exact area average) or ``"linear"`` (bilinear: the resize costs about
    a seventh as much, and aliases a little more).
    """

    default_id = "resize"
    knobs = _RESIZE_KNOBS
    consumes = ("image",)

    def __init__(self, resize: int = 256, crop: int = 224, layout: str = "NCHW",
                 channels: str = "RGB", value_range=(-1.0, 1.0), shrink: str = "area",
                 id: str | None = None):
        super().__init__(id, resize=resize, crop=crop, layout=layout, channels=channels,
                         value_range=[float(v) for v in value_range], shrink=shrink)

    def configure(self):
        p = self.params
        if len(p["value_range"]) != 2:
            raise ValueError(f"value_range must be (low, high), got {p['value_range']!r}")
        self.resize, self.crop, self.layout, self.shrink = p["resize"], p["crop"], p["layout"], p["shrink"]
        self.channels, self.value_range = p["channels"], tuple(p["value_range"])
        shape = (3, self.crop, self.crop) if self.layout == "NCHW" else (self.crop, self.crop, 3)
        self.spec = TensorSpec("float32", shape, self.layout, self.channels, self.value_range)
        self.requires = pa.schema([image_spec(self.channels).field("image")])
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


@register("decode_resize")
class DecodeResize(RowOperator):
    """data (file bytes) -> pixels: DecodeImage and ResizeCrop in one step.

    The planner puts it in place of ``DecodeImage(min_side=R or None) | ResizeCrop(resize=R)``:
    the same pixels, without moving each decoded photo through Arrow (the channel
    order is changed on the crop, not the photo).
    """

    default_id = "decode_resize"
    knobs = {**_RESIZE_KNOBS, "max_pixels": DecodeImage.knobs["max_pixels"],
             "reduced_decode": Knob(True, bool, doc="decode big JPEGs at reduced size"),
             "report_as": Knob(None, list, results=False,
                               doc="[decode id, resize id]: the steps failures are reported as"),
             **isolated.KNOBS}
    requires = pa.schema([pa.field("data", pa.binary())])
    consumes = ("data",)

    def __init__(self, resize_crop: ResizeCrop | None = None, max_pixels: int = 100_000_000,
                 reduced_decode: bool = True, id: str | None = None, report_as: list[str] | None = None,
                 **params):
        """``resize_crop``: the ResizeCrop step to fuse, or its parameters as keywords; the
        limits (``isolate``, ``time_limit``, ``memory_limit``) as keywords too."""
        limits = {k: params.pop(k) for k in isolated.KNOBS if k in params}
        params = dict(resize_crop.params if resize_crop is not None else ResizeCrop(**params).params)
        super().__init__(id, max_pixels=max_pixels, reduced_decode=reduced_decode, report_as=report_as,
                         **params, **limits)

    def configure(self):
        p = self.params
        self.resize = ResizeCrop.from_params({k: p[k] for k in _RESIZE_KNOBS})
        self.produces = self.resize.produces
        self.stage_ids = tuple(p["report_as"] or (self.id, self.id))  # failures in decoding, resizing

    setup = DecodeImage.setup

    def process_rows(self, rows):
        r, p = self.resize, self.params
        if not p["isolate"]:
            return super().process_rows(rows)
        job = (p["max_pixels"], r.resize if p["reduced_decode"] else None, r.channels, (r.resize, r.crop, r.shrink))
        return [{"pixels": r.to_pixels(out)} if isinstance(out, np.ndarray) else out
                for out in isolated.run(self, [row["data"] for row in rows], job, self.stage_ids)]

    def process_row(self, row):
        r, p = self.resize, self.params
        try:
            img = decode(row["data"], p["max_pixels"], r.resize if p["reduced_decode"] else None, "BGR")
        except Exception as exc:
            exc.stage = self.stage_ids[0]
            raise
        try:
            img = resize_crop(img, r.resize, r.crop, r.shrink)
        except Exception as exc:
            exc.stage = self.stage_ids[1]
            raise
        if r.channels == "RGB":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return {"pixels": r.to_pixels(img)}

    def to_array(self, field, values):
        return self.resize.to_array(field, values)


def fuse_decode_resize(decode_op: DecodeImage, resize: ResizeCrop) -> DecodeResize | None:
    """The planner's rule: one DecodeResize for a decode whose only reader is a resize
    that needs no more than the decode gives, or None where the pixels would differ."""
    d = decode_op.params
    if d["channels"] != resize.channels or d["min_side"] not in (None, resize.resize):
        return None
    return DecodeResize(resize, max_pixels=d["max_pixels"], reduced_decode=d["min_side"] is not None,
                        id=f"{decode_op.id}+{resize.id}", report_as=[decode_op.id, resize.id],
                        **{k: d[k] for k in isolated.KNOBS})

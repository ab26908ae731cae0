"""Arrow schemas and tensor contracts.

A tensor field carries more than a dtype: its shape, layout, channel order and
value range travel as JSON in the Arrow field metadata (key ``beamzoo.tensor``),
so a schema round-trips through Parquet, pickling and IPC, and a mismatch such
as BGR 0..255 NHWC feeding an RGB -1..1 NCHW model is caught when the graph is
built.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

TENSOR_KEY = b"beamzoo.tensor"

# Variable-shape images (decoded, before resizing) are stored as raw pixels.
IMAGE_STRUCT = pa.struct([
    ("data", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("channels", pa.int32()),
])

PATH = pa.field("path", pa.string(), nullable=False)
ID = pa.field("id", pa.string(), nullable=False)  # framework-owned record identity
PARENT_ID = pa.field("parent_id", pa.string(), nullable=False)  # on records made by a one-to-many step

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # the input's path or URL, else its id
    pa.field("stage", pa.string(), nullable=False),  # the id of the step that refused it
    pa.field("error", pa.string(), nullable=False),
    pa.field("key", pa.string()),  # the resume key, when the input got one before failing
    pa.field("parent_id", pa.string()),  # for a child record: its parent's id
])


class SchemaMismatchError(TypeError):
    """Two steps were connected whose schemas do not fit."""


@dataclass(frozen=True)
class TensorSpec:
    """The contract of one tensor per row.

    ``shape`` is the per-row shape; ``None`` marks a free dimension.
    ``layout`` names the stacked batch ("NCHW", "NHWC", "NC").
    ``channels`` is the channel order ("RGB", "BGR") for images.
    ``value_range`` is (low, high) of the values, e.g. (-1.0, 1.0).

    >>> want = TensorSpec("float32", (3, 224, 224), "NCHW", "RGB", (-1, 1))
    >>> want.mismatches(TensorSpec("float32", (3, 224, 224), "NCHW", "BGR", (-1, 1)))
    ['channels BGR, expected RGB']
    >>> TensorSpec.from_field(want.field("pixels")) == want
    True
    """

    dtype: str
    shape: tuple[int | None, ...]
    layout: str | None = None
    channels: str | None = None
    value_range: tuple[float, float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.value_range is not None:
            object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        if self.layout is not None and len(self.layout) != len(self.shape) + 1:
            raise ValueError(
                f"layout {self.layout!r} has {len(self.layout)} axes but a batch of "
                f"shape {self.shape} has {len(self.shape) + 1}")

    @property
    def fixed(self) -> bool:
        return all(d is not None for d in self.shape)

    def arrow_type(self) -> pa.DataType:
        if self.fixed:
            return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(self.dtype)), list(self.shape))
        return IMAGE_STRUCT

    def field(self, name: str) -> pa.Field:
        meta = json.dumps(asdict(self), sort_keys=True).encode()
        return pa.field(name, self.arrow_type(), metadata={TENSOR_KEY: meta})

    @classmethod
    def from_field(cls, field: pa.Field) -> TensorSpec | None:
        meta = field.metadata or {}
        if TENSOR_KEY not in meta:
            return None
        d = json.loads(meta[TENSOR_KEY])
        d["shape"] = tuple(d["shape"])
        if d.get("value_range") is not None:
            d["value_range"] = tuple(d["value_range"])
        return cls(**d)

    def mismatches(self, actual: TensorSpec) -> list[str]:
        """What in ``actual`` breaks this (expected) contract; empty if it fits."""
        out = []
        if actual.dtype != self.dtype:
            out.append(f"dtype {actual.dtype}, expected {self.dtype}")
        if len(actual.shape) != len(self.shape) or any(
                e is not None and a != e for a, e in zip(actual.shape, self.shape)):
            out.append(f"shape {list(actual.shape)}, expected {list(self.shape)}")
        for attr in ("layout", "channels", "value_range"):
            want, got = getattr(self, attr), getattr(actual, attr)
            if want is not None and got != want:
                out.append(f"{attr} {got}, expected {want}")
        return out


def describe(field: pa.Field) -> str:
    spec = TensorSpec.from_field(field)
    if spec is None:
        return f"{field.name}: {field.type}"
    extra = ", ".join(f"{k}={v}" for k, v in asdict(spec).items() if v is not None)
    return f"{field.name}: tensor({extra})"


def field_mismatch(expected: pa.Field, actual: pa.Field) -> str | None:
    """Why ``actual`` cannot stand where ``expected`` is required, or None."""
    want, got = TensorSpec.from_field(expected), TensorSpec.from_field(actual)
    if want is not None:
        if got is None:
            return f"'{actual.name}' is {actual.type} without a tensor contract, expected {describe(expected)}"
        problems = want.mismatches(got)
        return f"'{actual.name}' has " + "; ".join(problems) if problems else None
    if not actual.type.equals(expected.type):
        return f"'{actual.name}' is {actual.type}, expected {expected.type}"
    return None


def check_fits(step: str, required: pa.Schema, available: pa.Schema) -> None:
    """Raise SchemaMismatchError naming the step and each field that does not fit."""
    problems = []
    for field in required:
        idx = available.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing field {describe(field)}")
            continue
        why = field_mismatch(field, available.field(idx))
        if why:
            problems.append(why)
    if problems:
        have = ", ".join(describe(f) for f in available)
        raise SchemaMismatchError(
            f"step '{step}' cannot take its input: " + "; ".join(problems)
            + f". The input has: {have}.")


def image_array(images: list[np.ndarray]) -> pa.StructArray:
    """HxWxC uint8 images as an ``IMAGE_STRUCT`` array, their pixels copied once (one image's
    not at all): not through Python bytes."""
    sizes = [im.nbytes for im in images]
    offsets = pa.py_buffer(np.cumsum([0, *sizes], dtype=np.int32))
    flat = [np.ascontiguousarray(im).reshape(-1) for im in images]
    data = pa.py_buffer(flat[0] if len(flat) == 1 else np.concatenate(flat) if flat else np.empty(0, np.uint8))
    shapes = np.array([im.shape for im in images], np.int32).reshape(-1, 3)
    return pa.StructArray.from_arrays(
        [pa.Array.from_buffers(pa.binary(), len(images), [None, offsets, data]),
         *(pa.array(shapes[:, k], pa.int32()) for k in range(3))], fields=list(IMAGE_STRUCT))


def tensor_array(x: np.ndarray) -> pa.ExtensionArray:
    """Rows of a fixed-shape tensor column from an array shaped (rows, *shape); zero-copy
    when ``x`` is C-contiguous. Unlike pyarrow's own, it takes zero rows too."""
    if len(x):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x))
    typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(x.dtype), list(x.shape[1:]))
    return pa.ExtensionArray.from_storage(typ, pa.array([], typ.storage_type))

"""Images and boxes as Arrow values."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

QUAD = pa.list_(pa.list_(pa.float32(), 2), 4)  # four (x, y) corners


def pixels(im: dict) -> np.ndarray:
    """An image struct (data, height, width, channels) as an HxWxC uint8 array."""
    return np.frombuffer(im["data"], np.uint8).reshape(im["height"], im["width"], im["channels"])


def image_struct(img: np.ndarray) -> dict:
    img = np.ascontiguousarray(img)
    return {"data": img.tobytes(), "height": img.shape[0], "width": img.shape[1], "channels": img.shape[2]}

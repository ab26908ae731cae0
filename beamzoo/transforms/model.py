"""The knob that names a model, shared by every step that runs one.

A step holds a built-in or zoo model by ``name:version`` and a user's card
whole (JSON data), so a graph runs where no repository is; the knob's role
``model`` is how bundles and serving find a graph's models.
"""
from __future__ import annotations

from beamzoo.core.knobs import Knob
from beamzoo.zoo import card_param

MODEL = Knob(None, object, role="model", convert=card_param, required=True,
             doc="a zoo model (NAME or NAME:VERSION), the path of a card file, or a card")
INTRA_OP_THREADS = Knob(1, int, low=0, high=1024, results=False, tune=(1, 0),
                        doc="onnxruntime intra-op threads per session (1: workers run inference side by side; "
                            "0: all cores for each call)")

__all__ = ["INTRA_OP_THREADS", "MODEL"]

"""Serving the batch pipeline's graphs over HTTP: TF Serving REST, KServe v2, /metrics.

    beamzoo serve --model efficientnet_lite0 --port 8501

``Servable`` makes a served graph of a zoo model or a bundle, ``Server``
serves them, ``beamzoo.serve.client`` talks to it.
"""
from beamzoo.serve.models import Servable  # noqa: F401
from beamzoo.serve.server import Server  # noqa: F401

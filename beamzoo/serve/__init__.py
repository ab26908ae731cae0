"""Serving the batch pipeline's graphs over HTTP: TF Serving REST, KServe v2, /metrics.

    beamzoo serve --model efficientnet_lite0 --port 8501

``Servable`` makes a served graph of a zoo model or a bundle, ``Server``
serves them, ``beamzoo.serve.client`` talks to it, ``beamzoo.serve.remote``
is a graph step that sends rows to such servers. Imported lazily, so a
device graph with a remote step needs no server packages.
"""


def __getattr__(name):
    if name == "Servable":
        from beamzoo.serve.models import Servable
        return Servable
    if name == "Server":
        from beamzoo.serve.server import Server
        return Server
    raise AttributeError(name)


__all__ = ["Servable", "Server"]

"""Serving the batch pipeline's graphs over HTTP: TF Serving REST, KServe v2, /metrics.

    beamzoo serve --model efficientnet_lite0 --port 8501

``beamzoo.serve.models.Servable`` makes a served graph of a zoo model or a
bundle, ``beamzoo.serve.server.Server`` serves them, ``beamzoo.serve.client``
talks to it. The server's packages (Starlette, uvicorn, prometheus-client) are
needed only here: a device graph with a remote step (``beamzoo.transforms.remote``)
does without them.
"""

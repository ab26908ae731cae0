"""A small Python client of ``beamzoo serve`` (TF Serving REST and KServe v2), standard library only.

    from beamzoo.serve.client import Client
    c = Client("http://127.0.0.1:8501")
    c.predict("efficientnet_lite0", [open("cat.jpg", "rb").read()])  # -> [{"label": ..., ...}]

One keep-alive connection per client; use one client per thread.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
from urllib.parse import urlsplit


class ServerError(RuntimeError):
    """The server answered with an error status; ``status`` and ``body`` say what."""

    def __init__(self, status: int, body):
        msg = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {msg}")
        self.status, self.body = status, body


def _image(x) -> bytes:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    with open(os.fspath(x), "rb") as f:
        return f.read()


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8501", timeout: float = 60.0):
        u = urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self._conn = None

    def request(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
        """(status, decoded JSON or text); reconnects once if a kept-alive connection was closed."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, data, headers)
                r = self._conn.getresponse()
                text = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        if r.getheader("Connection", "").lower() == "close":
            self.close()
        ctype = r.getheader("Content-Type", "")
        return r.status, json.loads(text) if "json" in ctype else text.decode("utf-8", "replace")

    def predict(self, model: str, images: list, version: str | None = None) -> list[dict]:
        """TF Serving ``:predict``: one prediction per image (bytes or a path); a prediction
        of an image the server could not score is ``{"error", "stage"}``."""
        status, body = self.request("POST", _v1(model, version) + ":predict",
                                    {"instances": [{"b64": base64.b64encode(_image(i)).decode()} for i in images]})
        if status != 200 and not (status == 400 and isinstance(body, dict) and "predictions" in body):
            raise ServerError(status, body)
        return body["predictions"]

    def infer(self, model: str, images: list, version: str | None = None, id: str | None = None) -> dict:
        """KServe v2 ``/infer``: the answer, with its outputs by name."""
        data = [base64.b64encode(_image(i)).decode() for i in images]
        req = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}]}
        if id is not None:
            req["id"] = id
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, body = self.request("POST", path, req)
        if status != 200:
            raise ServerError(status, body)
        return body

    def metadata(self, model: str, version: str | None = None) -> dict:
        status, body = self.request("GET", _v1(model, version) + "/metadata")
        if status != 200:
            raise ServerError(status, body)
        return body

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _v1(model: str, version: str | None) -> str:
    return f"/v1/models/{model}" + (f"/versions/{version}" if version else "")

"""The KServe Python SDK's REST client against a KServe v2 server: run in the clients venv
(``tests/clients_venv.py``), it prints what it got as one JSON object.

    python tests/kserve_rest_client.py URL MODEL IMAGE...

Three requests of the same images, as the SDK makes them: ``binary``, the input
set with ``set_data_from_numpy`` (binary data after the JSON; the answer as the
SDK asks by default, JSON); ``binary_out``, the same asking
``binary_data_output``, with an unreadable instance added at the end; ``json``,
the input's ``data`` as base64 strings.
"""
from __future__ import annotations

import asyncio
import base64
import json
import sys

BAD = b"this is text, not an image"


def plain(v):
    return v.decode() if isinstance(v, bytes) else v


async def ask(client, url: str, model: str, request) -> dict:
    body, json_length = request.to_rest()
    head = body[:json_length] if json_length else json.dumps(body).encode()
    import httpx
    sent = {"sent": json.loads(head), "binary": json_length is not None}
    try:
        response = await client.infer(url, request, model_name=model)
    except httpx.HTTPStatusError as exc:
        return {**sent, "status": exc.response.status_code, "error": str(exc)}
    return {**sent, "status": 200, "id": response.id,
            "outputs": {o.name: [plain(v) for v in o.as_numpy().ravel().tolist()] for o in response.outputs},
            "shapes": {o.name: list(o.shape) for o in response.outputs}}


async def session(url: str, model: str, images: list[bytes]) -> dict:
    import numpy as np
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        got = {"live": await client.is_server_live(url), "ready": await client.is_server_ready(url),
               "model_ready": await client.is_model_ready(url, model),
               "unknown_model_ready": await client.is_model_ready(url, "no_such_model")}
        binary = InferInput("image", [len(images)], "BYTES")
        binary.set_data_from_numpy(np.array(images, dtype=object))
        got["binary"] = await ask(client, url, model, InferRequest(model, [binary], request_id="binary"))
        binary_out = InferInput("image", [len(images) + 1], "BYTES")
        binary_out.set_data_from_numpy(np.array(images + [BAD], dtype=object))
        got["binary_out"] = await ask(client, url, model, InferRequest(
            model, [binary_out], request_id="binary_out", parameters={"binary_data_output": True}))
        data = [base64.b64encode(b).decode() for b in images]
        got["json"] = await ask(client, url, model, InferRequest(
            model, [InferInput("image", [len(images)], "BYTES", data=data)], request_id="json"))
        return got
    finally:
        await client.close()


def main(argv: list[str]) -> int:
    url, model, *files = argv
    images = []
    for f in files:
        with open(f, "rb") as fh:
            images.append(fh.read())
    print(json.dumps(asyncio.run(session(url, model, images))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

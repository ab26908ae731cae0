"""The HTTP application (Starlette): TF Serving REST, KServe v2 (JSON and binary tensors), the
model repository API (``/v2/repository/...``, as Triton has it) and /metrics."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from beamzoo.serve import infer, protocol as P, repository
from beamzoo.serve.limits import RETRY_AFTER_S
from beamzoo.serve.models import UnknownServable, signature
from beamzoo.version import __version__

_TF_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<tail>:predict|/metadata)?$")
_V2_PATH = re.compile(r"^(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/infer|/ready)?$")


EXTENSIONS = ("binary_tensor_data", "model_repository")  # of KServe v2 / Triton
REPOSITORY_BODY_BYTES = 64 << 10  # the largest body of a repository request


def error(status: int, message: str, **extra) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
    if status == 408:
        headers["Connection"] = "close"  # what is left of the body is not read
    return JSONResponse({"error": message, **extra}, status, headers=headers)


async def read_body(request: Request, limit: int, hold, timeout: float) -> bytes:
    """The body, held in ``hold`` (a ``limits.Hold``); 413 past ``limit``, 408 unless it has all
    come within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(_read(request, limit, hold), timeout)
    except asyncio.TimeoutError:
        raise P.BadRequest(f"the body did not all come within {timeout:g} s (--body_timeout_s)", 408) from None


async def _read(request: Request, limit: int, hold) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise P.BadRequest(f"the body is over the limit of {limit} bytes (--max_body_bytes)", 413)
    if length is not None:
        hold.take(int(length))  # before a byte is read
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise P.BadRequest(f"the body is over the limit of {limit} bytes (--max_body_bytes)", 413)
        if length is None:
            hold.take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def answer_of(request: Request, future, seconds: float, budget: float) -> list:
    """The results of a service's ``future``; when ``seconds`` pass (504) or the client goes
    away first, the future is cancelled: the request's rows not yet run are dropped."""
    waiting = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    done = set()
    try:
        done, _ = await asyncio.wait((waiting, gone), timeout=max(0.0, seconds),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        dropped = future.cancel()
    if not dropped:  # answered in time
        return future.result()
    if gone in done:
        raise ClientDisconnect()
    raise P.BadRequest(f"no answer within {budget:g} s", 504)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":  # the body is read: only this comes
        pass


def make_app(server) -> Starlette:
    """``server``: a ``beamzoo.serve.server.Server`` (catalog, services, metrics, limits)."""
    catalog, metrics = server.catalog, server.metrics

    async def predict(request: Request, protocol: str, name: str, version: str | None):
        start = time.perf_counter()
        due = time.monotonic() + server.timeout_s  # the request's time budget, from its arrival
        label, ver, outcome = name, version or "", "error"
        hold = server.inflight.hold()
        try:
            server.lookup(name, version)  # an unknown model is refused before its body is read
            body = await read_body(request, server.max_body_bytes, hold, server.body_timeout_s)
            if protocol == "tf":
                form, items = P.parse_tf(P.parse_json(body))
                fields = None
            else:
                head, binary = P.split_binary(body, request.headers.get(P.HEADER_LENGTH))
                fields = server.lookup(name, version)[1].fields
                rid, items, names, binary_out = P.parse_v2(P.parse_json(head), fields, binary, name)
            pending = infer.submit(server, name, version, items)
            servable, service = pending.servable, pending.service
            label, ver = servable.name, servable.version
            answers = await answer_of(request, pending.future, due - time.monotonic(), server.timeout_s)
            results = infer.results(pending, answers, metrics)
            raw = b""
            if protocol == "tf":
                answer = P.tf_answer(form, results, service.fields)
            else:
                outputs, raw = P.v2_outputs(results, service.schema, names, binary_out)
                answer = {"model_name": servable.name, "model_version": servable.version,
                          **({"id": rid} if rid is not None else {}), "outputs": outputs}
            status, outcome = 200, infer.outcome(results)
            failure = infer.failed(results)
            if failure:  # nothing to answer with: the request failed
                status, message = failure
                outcome = infer.OUTCOME[status]
                answer = {"error": message, **answer}
                if raw:  # an error's body is read as JSON alone (tritonclient does): outputs as JSON data
                    answer["outputs"], raw = P.v2_outputs(results, service.schema, names)
            if not raw:
                return JSONResponse(answer, status)
            head = json.dumps(answer, separators=(",", ":")).encode()
            return Response(head + raw, status, media_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(len(head))})
        except ClientDisconnect:
            outcome = "disconnected"
            return Response(status_code=400)
        except Exception as exc:
            refused = infer.refusal(exc)
            if refused is None:
                raise
            status, outcome, message = refused
            return error(status, message)
        finally:
            hold.release()
            metrics.requests.labels(label, ver, protocol, outcome).inc()
            metrics.latency.labels(label, protocol).observe(time.perf_counter() - start)

    async def tf_models(request: Request):
        m = _TF_PATH.match(request.path_params["rest"])
        if not m:
            return error(404, f"no such path {request.url.path}; try /v1/models/NAME[/versions/V][:predict|/metadata]")
        name, version, tail = m["name"], m["version"], m["tail"]
        if request.method == "POST":
            if tail != ":predict":
                return error(405, f"POST {request.url.path}: use .../models/NAME[/versions/V]:predict")
            return await predict(request, "tf", name, version)
        if tail == ":predict":
            return error(405, "predict takes POST")
        try:
            s, service = server.lookup(name, version)
            versions = [version] if version else catalog.versions(name)
        except UnknownServable as exc:
            return error(404, str(exc))
        if tail == "/metadata":
            sig = signature(s.card)
            return JSONResponse({
                "model_spec": {"name": s.name, "signature_name": "", "version": s.version},
                "metadata": {"signature_def": {"signature_def": {"serving_default": {
                    "inputs": {P.IMAGE: {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]},
                                         "name": P.IMAGE}},
                    "outputs": {f.name: {"dtype": P.v2_datatype(f.type), "name": f.name}
                                for f in service.schema},
                    "method_name": "tensorflow/serving/predict"}}},
                    "model": {"ref": s.card.ref, **sig, "labels": len(s.card.labels)}}})
        return JSONResponse({"model_version_status": [
            {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            for v in versions]})

    async def v2_models(request: Request):
        m = _V2_PATH.match(request.path_params["rest"])
        if not m:
            return error(404, f"no such path {request.url.path}; try /v2/models/NAME[/versions/V][/infer|/ready]")
        name, version, tail = m["name"], m["version"], m["tail"]
        if request.method == "POST":
            if tail != "/infer":
                return error(405, f"POST {request.url.path}: use .../models/NAME[/versions/V]/infer")
            return await predict(request, "v2", name, version)
        if tail == "/infer":
            return error(405, "infer takes POST")
        try:
            s, service = server.lookup(name, version)
        except UnknownServable as exc:
            return error(404, str(exc))
        if tail == "/ready":
            ready = server.ready
            return JSONResponse({"name": s.name, "ready": ready}, 200 if ready else 503)
        return JSONResponse({"name": s.name, "versions": catalog.versions(s.name) if version is None else [s.version],
                             "platform": "beamzoo_onnxruntime",
                             "inputs": [{"name": P.IMAGE, "datatype": "BYTES", "shape": [-1]}],
                             "outputs": P.v2_tensor_meta(service.schema),
                             "parameters": {"ref": s.card.ref, "model": signature(s.card)}})

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": server.ready}, 200 if server.ready else 503)

    async def v2_server(request):
        return JSONResponse({"name": "beamzoo", "version": __version__, "extensions": list(EXTENSIONS)})

    async def repository_body(request: Request, allowed: tuple[str, ...]) -> dict:
        """A repository request's JSON body ({} when empty), with no fields but ``allowed``."""
        hold = server.inflight.hold()
        try:
            body = await read_body(request, REPOSITORY_BODY_BYTES, hold, server.body_timeout_s)
        finally:
            hold.release()
        got = P.parse_json(body) if body.strip() else {}
        if not isinstance(got, dict):
            raise P.BadRequest(f"the body must be a JSON object, got {type(got).__name__}")
        if got.get("parameters") == {}:
            del got["parameters"]
        unknown = sorted(set(got) - set(allowed))
        if unknown:
            raise P.BadRequest(f"{request.url.path} takes {', '.join(map(repr, allowed)) or 'no fields'}, "
                               f"not {', '.join(map(repr, unknown))}")
        return got

    async def repository_index(request):
        try:
            ready = (await repository_body(request, ("ready",))).get("ready", False)
            if not isinstance(ready, bool):
                raise P.BadRequest(f"'ready' must be true or false, got {json.dumps(ready)}")
            return JSONResponse(await run_in_threadpool(repository.index, server, ready))  # it lists the folder
        except Exception as exc:
            return refused(exc)

    async def repository_change(request, change):
        try:
            await repository_body(request, ())
            return JSONResponse(await run_in_threadpool(change, server, request.path_params["name"]))
        except repository.RepositoryError as exc:
            return error(exc.status, str(exc))
        except Exception as exc:
            return refused(exc)

    def refused(exc: Exception) -> JSONResponse:
        """The answer to a request refused as a whole (a bad body, the server busy or closing)."""
        known = infer.refusal(exc)
        if known is None:
            raise exc
        return error(known[0], known[2])

    async def repository_load(request):
        return await repository_change(request, repository.load)

    async def repository_unload(request):
        return await repository_change(request, repository.unload)

    async def metrics_text(request):
        return Response(metrics.text(), media_type=metrics.content_type)

    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def crash(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [Route("/v1/models/{rest:path}", tf_models, methods=["GET", "POST"]),
              Route("/v2", v2_server), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{rest:path}", v2_models, methods=["GET", "POST"]),
              Route("/v2/repository/index", repository_index, methods=["POST"]),
              Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
              Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
              Route("/metrics", metrics_text)]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close()  # after the last connection: answer what was accepted, stop the workers

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash},
                     lifespan=lifespan)

"""The HTTP application (Starlette): TF Serving REST, KServe v2 and /metrics."""
from __future__ import annotations

import asyncio
import contextlib
import re
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from beamzoo.serve import protocol as P
from beamzoo.serve.batcher import Closed, QueueFull
from beamzoo.serve.limits import RETRY_AFTER_S, Busy
from beamzoo.serve.models import UnknownServable, signature
from beamzoo.version import __version__

_TF_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<tail>:predict|/metadata)?$")
_V2_PATH = re.compile(r"^(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/infer|/ready)?$")
# what went wrong in a whole request -> the outcome label of the requests counter
_OUTCOME = {400: "bad_request", 404: "not_found", 405: "bad_request", 408: "slow_body", 413: "too_large",
            429: "queue_full", 503: "unavailable", 504: "timeout", 500: "error"}


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
            servable = catalog.get(name, version)
            label, ver = servable.name, servable.version
            service = server.services[(servable.name, servable.version)]
            body = P.parse_json(await read_body(request, server.max_body_bytes, hold, server.body_timeout_s))
            if protocol == "tf":
                form, items = P.parse_tf(body)
            else:
                rid, items, names = P.parse_v2(body, service.fields)
            if len(items) > server.max_queue:
                raise P.BadRequest(f"the request has {len(items)} instances; this server takes at most "
                                   f"{server.max_queue} in one request (--max_queue)", 413)
            good = [i for i in items if not isinstance(i, P.Unreadable)]
            future = service.submit(good)
            answers = iter(await answer_of(request, future, due - time.monotonic(), server.timeout_s))
            results = [{"error": str(i), "stage": "request"} if isinstance(i, P.Unreadable) else next(answers)
                       for i in items]
            for r in results:
                if r.get("stage") == "request":
                    metrics.dead.labels(label, "request").inc()
            failed = [r for r in results if "error" in r]
            results = P.clean(results)
            if protocol == "tf":
                answer = P.tf_answer(form, results, service.fields)
            else:
                answer = {"model_name": servable.name, "model_version": servable.version,
                          **({"id": rid} if rid is not None else {}),
                          "outputs": P.v2_outputs(results, service.schema, names)}
            if len(failed) == len(results):  # nothing to answer with: the request failed
                status = 500 if any(r["stage"] == "server" for r in failed) else 400
                outcome = _OUTCOME[status]
                first = failed[0]
                more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
                return JSONResponse({"error": f"{first['stage']}: {first['error']}{more}", **answer}, status)
            outcome = "partial" if failed else "ok"
            return JSONResponse(answer)
        except UnknownServable as exc:
            outcome = "not_found"
            return error(404, str(exc))
        except P.BadRequest as exc:
            outcome = _OUTCOME.get(exc.status, "bad_request")
            return error(exc.status, str(exc))
        except QueueFull as exc:
            outcome = "queue_full"
            return error(429, f"the server is busy: {exc}; retry later")
        except Busy as exc:
            outcome = "busy"
            return error(429, f"the server is busy: {exc}; retry later")
        except Closed as exc:
            outcome = "unavailable"
            return error(503, str(exc))
        except ClientDisconnect:
            outcome = "disconnected"
            return Response(status_code=400)
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
            s = catalog.get(name, version)
            versions = [version] if version else catalog.versions(name)
        except UnknownServable as exc:
            return error(404, str(exc))
        if tail == "/metadata":
            sig = signature(s.card)
            service = server.services[(s.name, s.version)]
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
            s = catalog.get(name, version)
        except UnknownServable as exc:
            return error(404, str(exc))
        if tail == "/ready":
            ready = server.ready
            return JSONResponse({"name": s.name, "ready": ready}, 200 if ready else 503)
        service = server.services[(s.name, s.version)]
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
        return JSONResponse({"name": "beamzoo", "version": __version__, "extensions": []})

    async def metrics_text(request):
        return Response(metrics.text(), media_type=metrics.content_type)

    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def crash(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [Route("/v1/models/{rest:path}", tf_models, methods=["GET", "POST"]),
              Route("/v2", v2_server), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{rest:path}", v2_models, methods=["GET", "POST"]),
              Route("/metrics", metrics_text)]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close()  # after the last connection: answer what was accepted, stop the workers

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash},
                     lifespan=lifespan)

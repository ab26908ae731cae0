"""KServe v2 over gRPC (``inference.GRPCInferenceService``): the HTTP app's answers, limits,
metrics and errors, from a ``grpc.server`` on threads of its own.

The protocol is ``grpc_v2.proto``, beside this module, read when the service starts into a
descriptor pool of its own: Triton's and KServe's Python clients put the same message names in
protobuf's default pool, and may live in the same process. ``ModelInfer`` takes one ``BYTES``
input named ``image`` (its elements in ``raw_input_contents``, or ``contents.bytes_contents``),
checked as ``protocol.parse_v2`` checks an HTTP request, and answers in ``raw_output_contents``,
as Triton does. A request refused as a whole gets the HTTP refusal's one line under the gRPC
code of its status (``CODES``); one whose every instance failed gets INVALID_ARGUMENT (INTERNAL
for a failure of the server's own). gRPC itself refuses a message over ``--max_body_bytes``
(and ``ENVELOPE_BYTES`` for the message around the images) with RESOURCE_EXHAUSTED before the
service sees it, and so it does calls past its threads at once (``--max_queue`` + ``--workers``,
at most ``MAX_THREADS``): neither is counted in ``beamzoo_requests``. The bytes of a request
are held in the server's ``--max_inflight_bytes`` while it waits for its answer.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import os
import tempfile
import time
import types
from concurrent import futures

import grpc

from beamzoo.serve import infer, protocol as P
from beamzoo.serve.app import EXTENSIONS
from beamzoo.serve.models import UnknownServable, signature
from beamzoo.serve.tensors import to_raw
from beamzoo.version import __version__

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "beamzoo_onnxruntime"
ENVELOPE_BYTES = 16 << 10  # a message's names, shapes and field headers, beyond its images' bytes
MAX_THREADS = 1024
DEADLINE_SLACK_S = 0.05  # a call that ended this close to its deadline ended by it
# the HTTP app's but the model repository: its RPCs (RepositoryIndex and the rest) are not served over gRPC
GRPC_EXTENSIONS = tuple(e for e in EXTENSIONS if e != "model_repository")
S = grpc.StatusCode
CODES = {400: S.INVALID_ARGUMENT, 404: S.NOT_FOUND, 413: S.RESOURCE_EXHAUSTED, 429: S.RESOURCE_EXHAUSTED,
         503: S.UNAVAILABLE, 504: S.DEADLINE_EXCEEDED, 500: S.INTERNAL}

@functools.cache
def messages():
    """The protocol's message classes (by name) and its service descriptor, in a pool of their own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    source = importlib.resources.files(__package__) / "grpc_v2.proto"
    if not source.is_file():
        raise RuntimeError(f"{source} is missing (beamzoo was installed without its package data): reinstall it")
    with importlib.resources.as_file(source) as path, tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "protocol.pb")
        code = protoc.main(["protoc", f"--proto_path={path.parent}", f"--descriptor_set_out={out}", path.name])
        if code != 0:
            raise RuntimeError(f"cannot read {path} (protoc exited with {code}): reinstall beamzoo")
        with open(out, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read()).file
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.AddSerializedFile(file.SerializeToString())
    service = pool.FindServiceByName(SERVICE)
    classes = {d.name: message_factory.GetMessageClass(d)
               for m in service.methods for d in (m.input_type, m.output_type)}
    return types.SimpleNamespace(service=service, **classes)


class GrpcHandle:
    """A running gRPC service: where it listens, and ``stop``."""

    def __init__(self, grpc_server, host: str, port: int):
        self._server, self.port = grpc_server, port
        self.url = f"{_url_host(host)}:{port}"

    def stop(self, grace_s: float | None = None) -> None:
        """Take no new calls; give those running ``grace_s`` seconds (None: all they need), then
        cancel them."""
        self._server.stop(grace_s).wait()


def start_grpc(server, host: str = "127.0.0.1", port: int = 0) -> GrpcHandle:
    """Serve ``server``'s models over gRPC on ``host:port`` (0: a free port); OSError when it
    cannot listen there."""
    threads = min(server.max_queue + server.workers, MAX_THREADS)  # a call waiting has rows queued
    receive = min(server.max_body_bytes + ENVELOPE_BYTES, 2**31 - 1)
    g = grpc.server(futures.ThreadPoolExecutor(threads, thread_name_prefix="beamzoo-grpc"),
                    maximum_concurrent_rpcs=threads,
                    options=[("grpc.max_receive_message_length", receive),
                             ("grpc.max_send_message_length", -1),
                             ("grpc.so_reuseport", 0)])  # a port taken is an error, not shared
    g.add_generic_rpc_handlers((Inference(server).handler(),))
    try:
        bound = g.add_insecure_port(f"{_url_host(host)}:{port}")
    except RuntimeError:  # gRPC has logged why
        bound = 0
    if not bound:
        g.stop(None)
        raise OSError(f"cannot listen on {host}:{port} for gRPC: the port is taken, or the address is not "
                      "this machine's")
    g.start()
    return GrpcHandle(g, host, bound)


class Ended(Exception):
    """The call ended (its client went away, or its deadline passed) before its answer."""


class Inference:
    """The service's methods, on a ``beamzoo.serve.server.Server``."""

    def __init__(self, server):
        self.server, self.pb = server, messages()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {}
        for m in self.pb.service.methods:
            request, response = getattr(self.pb, m.input_type.name), getattr(self.pb, m.output_type.name)
            methods[m.name] = grpc.unary_unary_rpc_method_handler(
                getattr(self, m.name), request_deserializer=request.FromString,
                response_serializer=response.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def ServerLive(self, request, context):
        return self.pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return self.pb.ServerReadyResponse(ready=self.server.ready)

    def ModelReady(self, request, context):
        try:
            self.server.lookup(request.name, request.version or None)
        except UnknownServable:
            return self.pb.ModelReadyResponse(ready=False)  # as Triton answers: not ready, no error
        return self.pb.ModelReadyResponse(ready=self.server.ready)

    def ServerMetadata(self, request, context):
        return self.pb.ServerMetadataResponse(name="beamzoo", version=__version__, extensions=list(GRPC_EXTENSIONS))

    def ModelMetadata(self, request, context):
        try:
            s, service = self.server.lookup(request.name, request.version or None)
        except UnknownServable as exc:
            return refuse(context, 404, str(exc), self.pb.ModelMetadataResponse())
        r = self.pb.ModelMetadataResponse(
            name=s.name, versions=[s.version] if request.version else self.server.catalog.versions(s.name),
            platform=PLATFORM, properties={"ref": s.card.ref, "model": json.dumps(signature(s.card))})
        r.inputs.add(name=P.IMAGE, datatype="BYTES", shape=[-1])
        for t in P.v2_tensor_meta(service.schema):
            r.outputs.add(**t)
        return r

    def ModelInfer(self, request, context):
        server, metrics = self.server, self.server.metrics
        start = time.perf_counter()
        due = time.monotonic() + server.timeout_s  # the request's time budget, from its arrival
        name, version = request.model_name, request.model_version or None
        label, ver, outcome = name, version or "", "error"
        hold = server.inflight.hold()
        try:
            fields = server.lookup(name, version)[1].fields
            hold.take(request.ByteSize())
            rid, items, names = parse_request(request, fields)
            pending = infer.submit(server, name, version, items)
            servable, service = pending.servable, pending.service
            label, ver = servable.name, servable.version
            results = infer.results(pending, answers(pending.future, context, due, server.timeout_s), metrics)
            failure = infer.failed(results)
            if failure:  # nothing to answer with: the request failed
                status, message = failure
                outcome = infer.OUTCOME[status]
                return refuse(context, status, message, self.pb.ModelInferResponse())
            outcome = infer.outcome(results)
            r = self.pb.ModelInferResponse(model_name=servable.name, model_version=servable.version, id=rid or "")
            for out, datatype, shape, flat in P.v2_tensors(results, service.schema, names):
                r.outputs.add(name=out, datatype=datatype, shape=shape)
                r.raw_output_contents.append(to_raw(datatype, flat))
            return r
        except Ended:
            outcome = "timeout" if context.time_remaining() <= DEADLINE_SLACK_S else "disconnected"
            return self.pb.ModelInferResponse()  # nobody waits for it
        except Exception as exc:  # noqa: BLE001 - every failure is this call's status, as HTTP's 500
            refused = infer.refusal(exc)
            if refused is None:
                return refuse(context, 500, f"internal error: {type(exc).__name__}: {exc}",
                              self.pb.ModelInferResponse())
            status, outcome, message = refused
            return refuse(context, status, message, self.pb.ModelInferResponse())
        finally:
            hold.release()
            metrics.requests.labels(label, ver, "grpc", outcome).inc()
            metrics.latency.labels(label, "grpc").observe(time.perf_counter() - start)


def answers(future, context, due: float, budget: float) -> list:
    """The results of a service's ``future``; once the call ends, or its time (the server's
    budget or the client's deadline, the sooner) is up, the future is cancelled: the request's
    rows not yet run are dropped."""
    if not context.add_callback(future.cancel):  # the call has ended already
        future.cancel()
    server_s, client_s = due - time.monotonic(), context.time_remaining()
    try:
        return future.result(timeout=max(0.0, min(server_s, client_s)))
    except futures.TimeoutError:
        if not future.cancel():  # answered as the time ran out
            return future.result()
        if server_s <= client_s:
            raise P.BadRequest(f"no answer within {budget:g} s", 504) from None
        raise P.BadRequest("no answer within the client's deadline", 504) from None
    except futures.CancelledError:
        raise Ended() from None


def parse_request(request, fields: list[str]) -> tuple[str | None, list, list[str]]:
    """(request id, one item per instance, the output names asked for) of a ``ModelInferRequest``,
    checked by ``protocol.parse_v2`` as the same request over HTTP with its images as binary data."""
    _no_parameters(request.parameters, "the request: ")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise P.BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s); "
                           "give one per input, in order")
    inputs = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in request.inputs]
    binary = b""
    if len(request.inputs) == 1:
        t = request.inputs[0]
        _no_parameters(t.parameters, f"input {t.name!r}: ")
        if raw and t.HasField("contents"):
            raise P.BadRequest(f"input {t.name!r} has both contents and raw_input_contents; give one")
        binary = raw[0] if raw else to_raw("BYTES", t.contents.bytes_contents)
        if not binary and t.datatype == "BYTES":
            raise P.BadRequest(f"input {t.name!r} has no data: give its encoded images in raw_input_contents "
                               "(or contents.bytes_contents)")
        inputs[0]["parameters"] = {"binary_data_size": len(binary)}
    body = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    if request.outputs:
        for o in request.outputs:
            _no_parameters(o.parameters, f"output {o.name!r}: ")
        body["outputs"] = [{"name": o.name} for o in request.outputs]
    rid, items, names, _ = P.parse_v2(body, fields, binary)
    return rid, items, names


def _no_parameters(params, where: str) -> None:
    if params:
        raise P.BadRequest(f"{where}unknown parameter(s) {', '.join(map(repr, sorted(params)))}; "
                           "beamzoo serve takes none over gRPC")


def refuse(context, status: int, message: str, empty):
    """End the call with the gRPC code of HTTP ``status`` and ``message``; ``empty`` is not sent."""
    context.set_code(CODES.get(status, S.INTERNAL))
    context.set_details(message)
    return empty


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["CODES", "GrpcHandle", "Inference", "messages", "parse_request", "start_grpc"]

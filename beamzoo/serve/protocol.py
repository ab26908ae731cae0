"""The two wire protocols, as pure functions: request bodies -> instances, answers -> bodies.

TF Serving REST: ``{"instances": [{"b64": ...} | {"image": {"b64": ...}}, ...]}``
(rows) or ``{"inputs": [...] | {"image": [...]}}`` (columns), answered with
``{"predictions": [...]}`` or ``{"outputs": {...}}``. KServe v2: one ``BYTES``
input whose data are base64 strings, or its raw bytes after the JSON (the
binary data extension: ``Inference-Header-Content-Length``, ``binary_data_size``),
answered with one output per prediction column, each as JSON data or, asked
with ``binary_data`` / ``binary_data_output``, as raw bytes after the JSON. An
instance that cannot be read is that instance's error, not the request's.
"""
from __future__ import annotations

import base64
import binascii
import json
import math

import pyarrow as pa

IMAGE = "image"  # the served input: an encoded image


class BadRequest(ValueError):
    """The request as a whole cannot be served: answered with ``status`` and ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Unreadable(str):
    """An instance that could not be read: why (it becomes that instance's error)."""


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


def b64(value, where: str) -> bytes | Unreadable:
    if not isinstance(value, str):
        return Unreadable(f"{where}: base64 data must be a string, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        return Unreadable(f"{where}: not valid base64 ({exc})")
    return data if data else Unreadable(f"{where}: the image is empty (0 bytes)")


def tf_instance(value, where: str) -> bytes | Unreadable:
    """``{"b64": ...}`` or ``{"image": {"b64": ...}}``."""
    if isinstance(value, dict) and set(value) == {IMAGE}:
        value, where = value[IMAGE], f"{where}.{IMAGE}"
    if isinstance(value, dict) and set(value) == {"b64"}:
        return b64(value["b64"], where)
    return Unreadable(f'{where}: expected {{"b64": "<base64 image>"}} or {{"image": {{"b64": ...}}}}, '
                      f"got {_show(value)}")


def parse_tf(body) -> tuple[str, list]:
    """("rows" | "columns", one item per instance: bytes, or Unreadable)."""
    if not isinstance(body, dict):
        raise BadRequest(f'the body must be a JSON object with "instances" or "inputs", got {_show(body)}')
    if "instances" in body and "inputs" in body:
        raise BadRequest('give "instances" (rows) or "inputs" (columns), not both')
    extra = sorted(set(body) - {"instances", "inputs", "signature_name"})
    if extra:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, extra))}; a predict request has "
                         '"instances" or "inputs" (and optionally "signature_name")')
    if "instances" in body:
        form, items = "rows", body["instances"]
        where = "instances[{}]"
    elif "inputs" in body:
        form, items = "columns", body["inputs"]
        if isinstance(items, dict) and set(items) == {IMAGE}:
            items = items[IMAGE]
        elif isinstance(items, dict) and set(items) != {"b64"}:
            raise BadRequest(f'"inputs" names the input "{IMAGE}" only, got {", ".join(map(repr, items))}')
        if isinstance(items, dict):
            items = [items]
        where = "inputs[{}]"
    else:
        raise BadRequest('a predict request needs "instances" (a list of {"b64": ...}) or "inputs"')
    if not isinstance(items, list) or not items:
        raise BadRequest(f"{form == 'rows' and 'instances' or 'inputs'} must be a non-empty list, "
                         f"got {_show(items)}")
    return form, [tf_instance(v, where.format(i)) for i, v in enumerate(items)]


def tf_answer(form: str, results: list[dict], fields: list[str]) -> dict:
    if form == "rows":
        return {"predictions": results}
    outputs = {f: [r.get(f) for r in results] for f in fields}
    if any("error" in r for r in results):
        outputs["error"] = [r.get("error") for r in results]
    return {"outputs": outputs}


HEADER_LENGTH = "inference-header-content-length"  # the binary data extension's JSON length
REQUEST_PARAMETERS = ("binary_data_output",)
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data",)


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON, the binary data after it) of a request body; without the extension's header
    the whole body is JSON."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length!r} must be the length of the body's "
                         f"JSON header, at most the body's {len(body)} bytes")
    n = int(header_length)
    return body[:n], body[n:]


def _parameters(value, allowed: tuple[str, ...], where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f'{where}"parameters" must be an object, got {_show(value)}')
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise BadRequest(f"{where}unknown parameter(s) {', '.join(map(repr, unknown))}; "
                         f"known here: {', '.join(allowed)}")
    return value


def _flag(params: dict, key: str, where: str) -> bool | None:
    v = params.get(key)
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"{where}parameter {key!r} must be true or false, got {_show(v)}")
    return v


def parse_v2(body, max_outputs: list[str], binary: bytes = b"", model: str | None = None
             ) -> tuple[str | None, list, list[str], set[str]]:
    """(request id, one item per instance, the output names asked for, those to send as binary
    data). ``binary``: the data after the JSON header (the binary data extension); ``model``: the
    model the path names, which a ``model_name`` field (the KServe SDK sends one) must match."""
    from beamzoo.serve.tensors import RawError, bytes_elements
    if not isinstance(body, dict):
        raise BadRequest(f'the body must be a JSON object with "inputs", got {_show(body)}')
    extra = sorted(set(body) - {"id", "inputs", "outputs", "parameters", "model_name"})
    if extra:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, extra))}; an inference request has "
                         '"inputs" (and optionally "id", "outputs", "parameters", "model_name")')
    if model is not None and body.get("model_name", model) != model:
        raise BadRequest(f'"model_name" {_show(body["model_name"])} is not the model of the path, {model!r}')
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f'"id" must be a string, got {_show(rid)}')
    binary_output = bool(_flag(_parameters(body.get("parameters"), REQUEST_PARAMETERS, ""),
                               "binary_data_output", ""))
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f'"inputs" must be a list of one tensor ({{"name": "{IMAGE}", "datatype": "BYTES", '
                         f'"shape": [N], "data": [base64, ...]}}), got {_show(inputs)}')
    t = inputs[0]
    size = _parameters(t.get("parameters"), INPUT_PARAMETERS, "inputs[0]: ").get("binary_data_size")
    missing = [k for k in ("name", "shape", "datatype", *(() if size is not None else ("data",))) if k not in t]
    if missing:
        raise BadRequest(f"input tensor lacks {', '.join(map(repr, missing))}")
    if t["name"] != IMAGE:
        raise BadRequest(f'the input is named "{IMAGE}" (encoded images), got {_show(t["name"])}')
    if t["datatype"] != "BYTES":
        raise BadRequest(f'input {t["name"]!r} must have datatype "BYTES" (encoded images), got {_show(t["datatype"])}')
    if size is not None:
        if "data" in t:
            raise BadRequest(f'input {t["name"]!r} has both "data" and binary_data_size; give one')
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise BadRequest(f'input {t["name"]!r}: binary_data_size {_show(size)} must be the {len(binary)} bytes '
                             "after the JSON header")
        try:
            data = bytes_elements(binary, f"input {t['name']!r}")
        except RawError as exc:
            raise BadRequest(str(exc)) from None
    else:
        if binary:
            raise BadRequest(f"the body has {len(binary)} bytes after its JSON header, but no input says "
                             "binary_data_size")
        data = t["data"]
    if not isinstance(data, list) or not data:
        raise BadRequest(f'input {t["name"]!r}: "data" must be a non-empty list, got {_show(data)}')
    shape = t["shape"]
    if not (isinstance(shape, list) and shape in ([len(data)], [len(data), 1])):
        raise BadRequest(f'input {t["name"]!r}: shape {_show(shape)} does not fit {len(data)} data items '
                         f"(expected [{len(data)}])")
    wanted = body.get("outputs")
    binary_names = set()
    if wanted is None:
        names = list(max_outputs)
        binary_names = set(names) | {"error"} if binary_output else set()
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise BadRequest('"outputs" must be a list of {"name": ...}')
        names = [o["name"] for o in wanted]
        unknown = [n for n in names if n not in max_outputs]
        if unknown:
            raise BadRequest(f"unknown output(s) {', '.join(map(repr, unknown))}; outputs: {', '.join(max_outputs)}")
        for i, o in enumerate(wanted):
            where = f"outputs[{i}]: "
            flag = _flag(_parameters(o.get("parameters"), OUTPUT_PARAMETERS, where), "binary_data", where)
            if flag or (flag is None and binary_output):
                binary_names.add(o["name"])
        if binary_output:
            binary_names.add("error")
    if size is not None:
        items = [v if v else Unreadable(f"inputs[0].data[{i}]: the image is empty (0 bytes)")
                 for i, v in enumerate(data)]
    else:
        items = [tf_instance(v, f"inputs[0].data[{i}]") if isinstance(v, dict) else b64(v, f"inputs[0].data[{i}]")
                 for i, v in enumerate(data)]
    return rid, items, names, binary_names


def v2_datatype(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return "BYTES"
    if pa.types.is_floating(t):
        return {16: "FP16", 32: "FP32", 64: "FP64"}[t.bit_width]
    if pa.types.is_boolean(t):
        return "BOOL"
    if pa.types.is_integer(t):
        return ("INT" if pa.types.is_signed_integer(t) else "UINT") + str(t.bit_width)
    return "BYTES"


def v2_tensors(results: list[dict], schema: pa.Schema, names: list[str]) -> list[tuple[str, str, list, list]]:
    """(name, datatype, shape, values row-major) per output, rows in order; a failed row's values
    are None, its reason in the ``error`` output (there only when a row failed)."""
    outs = []
    n = len(results)
    for name in names:
        t = schema.field(name).type
        values = [r.get(name) for r in results]
        if pa.types.is_list(t):
            k = max((len(v) for v in values if v is not None), default=0)
            flat = [x for v in values for x in (v if v is not None else [None] * k)]
            outs.append((name, v2_datatype(t), [n, k], flat))
        else:
            outs.append((name, v2_datatype(t), [n], values))
    if any("error" in r for r in results):
        outs.append(("error", "BYTES", [n], [r.get("error") for r in results]))
    return outs


def v2_outputs(results: list[dict], schema: pa.Schema, names: list[str], binary: set[str] = frozenset()
               ) -> tuple[list[dict], bytes]:
    """The answer's output tensors, and the binary data after the JSON for those in ``binary``."""
    from beamzoo.serve.tensors import to_raw
    outs, raw = [], []
    for name, datatype, shape, flat in v2_tensors(results, schema, names):
        if name in binary:
            data = to_raw(datatype, flat)
            raw.append(data)
            outs.append({"name": name, "datatype": datatype, "shape": shape,
                         "parameters": {"binary_data_size": len(data)}})
        else:
            outs.append({"name": name, "datatype": datatype, "shape": shape, "data": flat})
    return outs, b"".join(raw)


def v2_tensor_meta(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "datatype": v2_datatype(f.type), "shape": [-1, -1] if pa.types.is_list(f.type) else [-1]}
            for f in schema]


def clean(value):
    """JSON has no NaN: a non-finite float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


def _show(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

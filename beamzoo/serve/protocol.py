"""The two wire protocols, as pure functions: request bodies -> instances, answers -> bodies.

TF Serving REST: ``{"instances": [{"b64": ...} | {"image": {"b64": ...}}, ...]}``
(rows) or ``{"inputs": [...] | {"image": [...]}}`` (columns), answered with
``{"predictions": [...]}`` or ``{"outputs": {...}}``. KServe v2: one ``BYTES``
input whose data are base64 strings, answered with one output per prediction
column. An instance that cannot be read is that instance's error, not the
request's.
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


def parse_v2(body, max_outputs: list[str]) -> tuple[str | None, list, list[str]]:
    """(request id, one item per instance, the output names asked for)."""
    if not isinstance(body, dict):
        raise BadRequest(f'the body must be a JSON object with "inputs", got {_show(body)}')
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f'"id" must be a string, got {_show(rid)}')
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f'"inputs" must be a list of one tensor ({{"name": "{IMAGE}", "datatype": "BYTES", '
                         f'"shape": [N], "data": [base64, ...]}}), got {_show(inputs)}')
    t = inputs[0]
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in t]
    if missing:
        raise BadRequest(f"input tensor lacks {', '.join(map(repr, missing))}")
    if t["datatype"] != "BYTES":
        raise BadRequest(f'input {t["name"]!r} must have datatype "BYTES" (encoded images), got {_show(t["datatype"])}')
    data = t["data"]
    if not isinstance(data, list) or not data:
        raise BadRequest(f'input {t["name"]!r}: "data" must be a non-empty list, got {_show(data)}')
    shape = t["shape"]
    if not (isinstance(shape, list) and shape in ([len(data)], [len(data), 1])):
        raise BadRequest(f'input {t["name"]!r}: shape {_show(shape)} does not fit {len(data)} data items '
                         f"(expected [{len(data)}])")
    wanted = body.get("outputs")
    if wanted is None:
        names = list(max_outputs)
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise BadRequest('"outputs" must be a list of {"name": ...}')
        names = [o["name"] for o in wanted]
        unknown = [n for n in names if n not in max_outputs]
        if unknown:
            raise BadRequest(f"unknown output(s) {', '.join(map(repr, unknown))}; outputs: {', '.join(max_outputs)}")
    items = [tf_instance(v, f"inputs[0].data[{i}]") if isinstance(v, dict) else b64(v, f"inputs[0].data[{i}]")
             for i, v in enumerate(data)]
    return rid, items, names


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


def v2_outputs(results: list[dict], schema: pa.Schema, names: list[str]) -> list[dict]:
    """One output tensor per column, rows in order; a failed row's values are null, its
    reason in the ``error`` output."""
    outs = []
    n = len(results)
    for name in names:
        t = schema.field(name).type
        values = [r.get(name) for r in results]
        if pa.types.is_list(t):
            k = max((len(v) for v in values if v is not None), default=0)
            flat = [x for v in values for x in (v if v is not None else [None] * k)]
            outs.append({"name": name, "datatype": v2_datatype(t), "shape": [n, k], "data": flat})
        else:
            outs.append({"name": name, "datatype": v2_datatype(t), "shape": [n], "data": values})
    if any("error" in r for r in results):
        outs.append({"name": "error", "datatype": "BYTES", "shape": [n],
                     "data": [r.get("error") for r in results]})
    return outs


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

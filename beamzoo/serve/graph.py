"""A batch graph as a served graph: requests in, responses out.

``serving_graph`` takes the graph a batch pipeline runs (``files -> read ->
... -> write``, dead letters -> a second sink) and replaces its ends: the
file source and the step that reads the files become one ``requests`` source
(each row an instance's bytes, as ``read`` would have made them), the
predictions sink becomes a ``responses`` sink, and dead-letter sinks go (a
dead letter is that instance's error). Every step in between is the batch
graph's own step. ``Engine`` runs the planned stages in this thread on the
same operators, their heavy state shared per process (``beamzoo.resources``).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from beamzoo.core import Operator, register
from beamzoo.graph import DEAD, Graph, GraphError, Step, split_ref
from beamzoo.plan import Plan, check_kinds, plan
from beamzoo.schemas import ID, PATH
from beamzoo.transforms.sinks import is_raw

DATA = pa.field("data", pa.binary())
REQUEST_SCHEMA = pa.schema([ID, PATH, DATA])
LEFT_OUT = ("id", "path", "key", "parent_id")  # no meaning in an answer to a request


@register("requests")
class Requests(Operator):
    """The instances of requests: ``id``, ``path`` (the instance's name) and ``data`` (its bytes)."""

    kind = "source"
    parallel = False
    default_id = "requests"

    def output_schemas(self, inputs):
        return {"out": REQUEST_SCHEMA}


@register("responses")
class Responses(Operator):
    """The rows that answer requests."""

    kind = "sink"
    parallel = False
    default_id = "responses"

    @property
    def ports(self):
        return ()

    def output_schemas(self, inputs):
        return {}


def serving_graph(graph: Graph) -> Graph:
    """``graph`` with a request source and a response sink in place of its files and outputs."""
    sources = [s for s in graph.steps if s.kind == "source"]
    if len(sources) != 1:
        raise GraphError(f"a served graph reads one input; this one has {len(sources)} sources")
    (src,) = sources
    readers = graph.consumers(src.id)
    if len(readers) != 1 or readers[0].op != "read_files":
        raise GraphError(f"a served graph starts by reading files (source {src.id!r} -> read_files); "
                         f"{src.id!r} is read by {', '.join(s.op for s in readers) or 'nothing'}")
    read = readers[0]
    outputs = [s for s in graph.steps if s.kind == "sink" and DEAD not in s.inputs]
    if len(outputs) != 1:
        raise GraphError(f"a served graph answers from one output; this one has {len(outputs)} "
                         f"(sinks {', '.join(s.id for s in outputs)})")
    steps = [Step("requests", "source", "requests")]
    for s in graph.steps:
        if s in (src, read) or (s.kind == "sink" and DEAD in s.inputs):
            continue
        inputs = tuple("requests" if split_ref(r) == (read.id, "out") else r for r in s.inputs)
        if s is outputs[0]:
            steps.append(Step("responses", "sink", "responses", "{}", inputs))
        else:
            steps.append(Step(s.id, s.kind, s.op, s.params_json, inputs))
    return Graph(tuple(steps))


@dataclass
class Answer:
    """What the graph made of a batch: answer fields by row id, and (stage, reason) by row id."""

    rows: dict[str, dict]
    errors: dict[str, tuple[str, str]]


class Engine:
    """One thread's operators for a planned served graph (heavy state shared per process)."""

    KINDS = ("source", "map", "route", "explode", "merge", "sink")

    def __init__(self, served: Plan | Graph):
        self.plan = served if isinstance(served, Plan) else plan(served)
        check_kinds(self.plan, dict.fromkeys(self.KINDS), "the server")
        self.ops = {st.id: st.operators() for st in self.plan.stages}
        for st in self.plan.stages:
            for op, step in zip(self.ops[st.id], st.steps):
                if st.kind == "merge":
                    op.output_schemas([self.plan.graph.schema(r) for r in step.inputs])
                op.setup()
        sink = next(st for st in self.plan.stages if st.kind == "sink")
        schema = self.plan.graph.schema(sink.steps[0].inputs[0])
        self.schema = pa.schema([f for f in schema if f.name not in LEFT_OUT and not is_raw(f)])
        self.fields = self.schema.names

    def run(self, batch: pa.RecordBatch) -> Answer:
        ports: dict[str, list[pa.RecordBatch]] = {}
        errors: dict[str, tuple[str, str]] = {}
        rows: dict[str, dict] = {}

        def dead(d: pa.RecordBatch):
            for i, stage, error in zip(d.column("id").to_pylist(), d.column("stage").to_pylist(),
                                       d.column("error").to_pylist()):
                errors[i] = (stage, error)

        for st in self.plan.stages:
            ops = self.ops[st.id]
            if st.kind == "source":
                ports[f"{st.id}:out"] = [batch]
                continue
            ins = [b for r in st.inputs for b in ports.get(r, ())]
            if st.kind == "sink":
                for b in ins:
                    for r in b.select(["id", *self.fields]).to_pylist():
                        rows[r.pop("id")] = r
                continue
            for b in ins:
                if b.num_rows == 0:
                    continue
                if st.kind in ("route", "explode"):
                    outs, d = ops[0].process(b)
                    dead(d)
                    for port, out in outs.items():
                        if out.num_rows:
                            ports.setdefault(f"{st.id}:{port}", []).append(out)
                    continue
                for op in ops:  # fused maps, or a merge
                    b, d = op.process(b)
                    dead(d)
                    if b.num_rows == 0:
                        break
                else:
                    ports.setdefault(f"{st.id}:out", []).append(b)
        return Answer(rows, errors)

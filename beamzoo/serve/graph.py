"""A batch graph as a served graph: requests in, responses out.

``serving_ends`` is a compiler pass: it takes the graph a batch pipeline runs
(``files -> read -> ... -> write``, dead letters -> a second sink) and
replaces its ends. The source and the step that loads its inputs
(``Operator.loads_input``) become one ``requests`` source (each row an
instance's bytes, as the loader would have made them), the answers' sink a
``responses`` sink, and dead-letter sinks go (a dead letter is that instance's
error). Every step in between is the batch graph's own step, placement and
all. The in-thread runner's ``Engine`` runs the plan, per batch of requests.
"""
from __future__ import annotations

import pyarrow as pa

from beamzoo.core.compile import STANDARD, Plan, compile, derived, rewire
from beamzoo.core.graph import DEAD, Graph, GraphError
from beamzoo.core.registry import op_class
from beamzoo.transforms.serving import REQUEST_SCHEMA, Requests, Responses
from beamzoo.transforms.sinks import is_raw

LEFT_OUT = ("id", "path", "key", "parent_id")  # no meaning in an answer to a request


def serving_ends(graph: Graph) -> Graph:
    """``graph`` with a request source and a response sink in place of its source and sinks."""
    sources = [s for s in graph.steps if s.kind == "source"]
    if len(sources) != 1:
        raise GraphError(f"a served graph reads one input; this one has {len(sources)} sources")
    (src,) = sources
    readers = graph.consumers(src.id)
    if len(readers) != 1 or not op_class(readers[0].op).loads_input:
        raise GraphError(f"a served graph starts by loading its inputs (source {src.id!r} -> a step that reads "
                         f"files); {src.id!r} is read by {', '.join(s.op for s in readers) or 'nothing'}")
    (loader,) = readers
    answers = [s for s in graph.steps if s.kind == "sink" and DEAD not in s.inputs]
    if len(answers) != 1:
        raise GraphError(f"a served graph answers from one output; this one has {len(answers)} "
                         f"(sinks {', '.join(s.id for s in answers)})")
    (sink,) = answers
    requests = derived(Requests(), (), like=loader)
    responses = derived(Responses(), sink.inputs, like=sink)
    dead_sinks = {s.id for s in graph.steps if s.kind == "sink" and DEAD in s.inputs}
    return rewire(graph, drop={src.id, loader.id, sink.id, *dead_sinks}, add=[requests, responses],
                  moves={f"{loader.id}:out": requests.id, f"{src.id}:out": requests.id})  # the composites' too


def served_plan(graph: Graph) -> Plan:
    """The plan a server runs for a batch graph."""
    return compile(graph, (serving_ends, *STANDARD))


def answer_schema(plan: Plan) -> pa.Schema:
    """The fields of an answer: what reaches the responses, but ids and raw columns."""
    sink = next(st for st in plan.stages if st.kind == "sink" and DEAD not in st.inputs)
    schema = plan.graph.schema(sink.steps[0].inputs[0])
    return pa.schema([f for f in schema if f.name not in LEFT_OUT and not is_raw(f)])


__all__ = ["LEFT_OUT", "REQUEST_SCHEMA", "answer_schema", "served_plan", "serving_ends"]

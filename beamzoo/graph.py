"""The logical graph: a DAG of frozen steps with named, typed ports.

A step is data: an ``id``, its primitive ``kind``, the ``op`` that implements
it (a name registered in ``beamzoo.core.OPS``), JSON parameters, and the refs
of its inputs. A ref is ``"step"`` (its ``out`` port), ``"step:port"`` (say a
route's branch) or ``"@dead"`` (the dead letters of every step). Building a
``Graph`` checks every edge: ids are unique, refs exist, there is no cycle,
each step's required fields fit what reaches it (tensor contracts included),
and no column is produced twice. The graph round-trips through JSON exactly
and its fingerprint is a hash of that JSON, so it is the same in every
process.

>>> from beamzoo.transforms.sources import Files
>>> from beamzoo.transforms.io import ReadFiles
>>> g = (Graph.source(Files("imgs/*.jpg")) | ReadFiles()).graph
>>> [s.id for s in g.steps], g.schema("read").names
(['files', 'read'], ['id', 'path', 'data'])
>>> Graph.from_json(g.to_json()) == g
True
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from beamzoo.core import PRIMITIVES, Operator, check_placement, op_class
from beamzoo.schemas import DEAD_LETTER_SCHEMA, SchemaMismatchError, check_fits

DEAD = "@dead"
FORMAT = 1
_ARITY = {"source": (0, 0), "map": (1, 1), "explode": (1, 1), "route": (1, 1), "sink": (1, 1),
          "merge": (1, 64), "collect": (2, 2)}


class GraphError(ValueError):
    """The graph's structure is wrong: a duplicate id, a missing ref, a cycle, a column made twice."""


def canonical(value: Any, what: str = "value") -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GraphError(f"{what} is not plain JSON ({exc}); step parameters must be JSON data") from None


@dataclass(frozen=True)
class Step:
    """One node: ``kind`` is a primitive, ``op`` its implementation."""

    id: str
    kind: str
    op: str
    params_json: str = "{}"
    inputs: tuple[str, ...] = ()
    placement: tuple[tuple[str, str], ...] = ()  # hints (tier, device): never in the fingerprint

    @classmethod
    def of(cls, op: Operator, inputs: tuple[str, ...]) -> Step:
        return cls(op.id, op.kind, op.op_name, canonical(op.params, f"step {op.id!r}'s parameters"),
                   tuple(inputs), tuple(check_placement(op.id, op.placement).items()))

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def operator(self) -> Operator:
        """A fresh operator for this step (no heavy state until ``setup``)."""
        cls = op_class(self.op)
        if cls.kind != self.kind:
            raise GraphError(f"step {self.id!r}: op {self.op!r} is a {cls.kind}, the graph says {self.kind}")
        op = cls.from_params(self.params, id=self.id)
        if self.placement:
            op.placement = dict(self.placement)
        return op

    def to_dict(self) -> dict:
        d = {"id": self.id, "kind": self.kind, "op": self.op, "params": self.params, "inputs": list(self.inputs)}
        if self.placement:
            d["placement"] = dict(self.placement)
        return d


def split_ref(ref: str) -> tuple[str, str]:
    step, _, port = ref.partition(":")
    return step, port or "out"


@dataclass(frozen=True)
class Graph:
    """An immutable, checked DAG of steps (in a topological order)."""

    steps: tuple[Step, ...]
    schemas: dict = field(default=None, repr=False, compare=False, hash=False)

    def __post_init__(self):
        steps = _ordered(tuple(self.steps))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "schemas", _check(steps))

    @staticmethod
    def source(op: Operator) -> Stream:
        """Start a graph from a source operator; returns its output stream."""
        if op.kind != "source":
            raise GraphError(f"{op!r} is a {op.kind}, not a source")
        return Stream(Graph((Step.of(op, ()),)), op.id)

    def step(self, id: str) -> Step:
        for s in self.steps:
            if s.id == id:
                return s
        raise KeyError(f"no step {id!r} in the graph")

    def schema(self, ref: str) -> pa.Schema:
        """The schema of the rows at ``ref``."""
        return DEAD_LETTER_SCHEMA if ref == DEAD else self.schemas[_full(ref)]

    def consumers(self, ref: str) -> list[Step]:
        ref = _full(ref)
        return [s for s in self.steps if any(_full(r) == ref for r in s.inputs)]

    def union(self, other: Graph) -> Graph:
        """Both graphs' steps; a shared id must be the very same step."""
        mine = {s.id: s for s in self.steps}
        extra = []
        for s in other.steps:
            if s.id not in mine:
                extra.append(s)
            elif mine[s.id] != s:
                raise GraphError(f"step id {s.id!r} is used twice, for {_describe(mine[s.id])} and "
                                 f"{_describe(s)}; name one of them: \"other_name\" >> {s.op}(...)")
        return Graph(self.steps + tuple(extra)) if extra else self

    def to_json(self) -> str:
        return json.dumps({"beamzoo_graph": FORMAT, "steps": [s.to_dict() for s in self.steps]},
                          sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Graph:
        data = json.loads(text)
        if data.get("beamzoo_graph") != FORMAT:
            raise GraphError(f"not a beamzoo graph of format {FORMAT} (got {data.get('beamzoo_graph')!r})")
        return cls(tuple(Step(d["id"], d["kind"], d["op"], canonical(d.get("params", {})),
                              tuple(d.get("inputs", ())),
                              tuple(check_placement(d["id"], d.get("placement") or {}).items()))
                         for d in data["steps"]))

    def fingerprint(self, kinds: tuple[str, ...] = PRIMITIVES) -> str:
        """sha256 of what defines the results: each step's kind, op, inputs and the knobs
        that change results (not batch sizes or threads). ``kinds`` limits it to some
        primitives (resume keys leave out sources and sinks: where files are read from and
        written to does not change a row)."""
        text = canonical([{"id": s.id, "kind": s.kind, "op": s.op, "inputs": list(s.inputs),
                           "params": s.operator().result_params()}
                          for s in self.steps if s.kind in kinds])
        return hashlib.sha256(text.encode()).hexdigest()


def _full(ref: str) -> str:
    return ref if ref == DEAD else "%s:%s" % split_ref(ref)


def _describe(s: Step) -> str:
    return f"{s.op} (reading {', '.join(s.inputs) or 'nothing'})"


def _ordered(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """The steps in a topological order (stable); refuses duplicate ids, dangling refs, cycles."""
    by_id: dict[str, Step] = {}
    for s in steps:
        if not s.id or ":" in s.id or s.id.startswith("@"):
            raise GraphError(f"step id {s.id!r} is not allowed (no ':' and no leading '@')")
        if s.id in by_id:
            raise GraphError(f"step id {s.id!r} is used twice, for {_describe(by_id[s.id])} and "
                             f"{_describe(s)}; give each step its own id")
        by_id[s.id] = s
    deps = {}
    for s in steps:
        if s.kind not in _ARITY:
            deps[s.id] = set()
            continue
        lo, hi = _ARITY[s.kind]
        if not lo <= len(s.inputs) <= hi:
            raise GraphError(f"step {s.id!r} ({s.kind}) takes {lo if lo == hi else f'{lo} to {hi}'} "
                             f"inputs, got {len(s.inputs)}")
        for ref in s.inputs:
            if ref != DEAD and split_ref(ref)[0] not in by_id:
                raise GraphError(f"step {s.id!r} reads {ref!r}, but there is no step {split_ref(ref)[0]!r}")
        deps[s.id] = {split_ref(r)[0] for r in s.inputs if r != DEAD}
    done: list[str] = []
    left = dict(deps)
    while left:
        ready = [i for i in left if not left[i] - set(done)]  # dict order keeps it stable
        if not ready:
            raise GraphError(f"the graph has a cycle through steps {', '.join(sorted(left))}")
        done.extend(ready)
        for i in ready:
            del left[i]
    # dead-letter sinks read every step: they go last
    order = sorted(done, key=lambda i: DEAD in by_id[i].inputs)
    return tuple(by_id[i] for i in order)


def _check(steps: tuple[Step, ...]) -> dict[str, pa.Schema]:
    """Every port's schema; refuses misfits and columns produced twice."""
    schemas: dict[str, pa.Schema] = {}
    origin: dict[str, dict[str, str]] = {}  # port -> field -> the step that made it
    for s in steps:
        if s.kind not in _ARITY:
            continue  # an unknown primitive: a runner refuses it by name
        op = s.operator()
        ins = [DEAD_LETTER_SCHEMA if r == DEAD else schemas[_full(r)] for r in s.inputs]
        made_by = [{} if r == DEAD else origin[_full(r)] for r in s.inputs]
        if op.kind in ("map", "explode", "route", "sink"):
            check_fits(s.id, op.requires, ins[0])
        for name in op.produced(ins) if op.kind != "collect" else ():  # a collect checks its parents
            for schema, made in zip(ins[:1], made_by[:1]):
                if name in schema.names and name not in op.consumes:
                    raise GraphError(
                        f"column {name!r} is produced twice: by step {made.get(name, '?')!r} and by "
                        f"step {s.id!r}; give one of them other output names (e.g. prefix=...)")
        try:
            outs = op.output_schemas(ins)
        except SchemaMismatchError:
            raise
        except (TypeError, ValueError) as exc:
            raise SchemaMismatchError(f"step {s.id!r} cannot take its input: {exc}") from None
        for port, schema in outs.items():
            ref = f"{s.id}:{port}"
            schemas[ref] = schema
            inherited = {k: v for m in made_by for k, v in m.items()}
            origin[ref] = {f.name: inherited.get(f.name, s.id) for f in schema}
    return schemas


class Stream:
    """A port of a graph under construction: ``stream | op`` adds a step after it."""

    def __init__(self, graph: Graph, ref: str, pipeline=None):
        self.graph, self.ref, self.pipeline = graph, ref, pipeline
        if pipeline is not None:
            pipeline._add(graph)

    @property
    def schema(self) -> pa.Schema:
        return self.graph.schema(self.ref)

    def __or__(self, other):
        if isinstance(other, Composite):
            return other.expand(self)
        if isinstance(other, Operator):
            return apply(other, [self])
        raise TypeError(f"a graph step must be a beamzoo operator or composite, got {other!r}")

    def __repr__(self):
        return f"Stream({self.ref!r}: {', '.join(self.schema.names)})"


class Ports:
    """The named output ports of a step, e.g. a route's branches: ``ports.low`` / ``ports["low"]``."""

    def __init__(self, streams: dict[str, Stream]):
        self._streams = streams

    def __getitem__(self, name: str) -> Stream:
        return self._streams[name]

    def __getattr__(self, name: str) -> Stream:
        try:
            return self._streams[name]
        except KeyError:
            raise AttributeError(f"no port {name!r}; ports: {', '.join(self._streams)}") from None

    def __iter__(self):
        return iter(self._streams.values())


def apply(op: Operator, inputs: list[Stream]) -> Stream | Ports:
    """Add ``op`` reading ``inputs``; returns its output stream (or ports)."""
    if op.kind == "source":
        raise GraphError(f"{op!r} is a source: start a pipeline with it (pipeline | {type(op).__name__}(...))")
    graph = inputs[0].graph
    for s in inputs[1:]:
        graph = graph.union(s.graph)
    graph = graph.union(Graph((*graph.steps, Step.of(op, tuple(s.ref for s in inputs)))))
    pipeline = next((s.pipeline for s in inputs if s.pipeline is not None), None)
    if pipeline is not None:
        pipeline._add(graph)
    ports = op.ports
    if not ports:  # a sink
        return Sunk(graph)
    if len(ports) == 1:
        return Stream(graph, f"{op.id}" if ports[0] == "out" else f"{op.id}:{ports[0]}", pipeline)
    return Ports({p: Stream(graph, f"{op.id}:{p}", pipeline) for p in ports})


@dataclass(frozen=True)
class Sunk:
    """What applying a sink returns: the graph that now ends in it."""

    graph: Graph


class Composite:
    """A reusable piece of graph: ``expand(stream)`` adds steps and returns the stream out."""

    def expand(self, stream: Stream) -> Stream:
        raise NotImplementedError

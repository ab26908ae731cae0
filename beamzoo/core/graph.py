"""The logical graph: a DAG of frozen steps with named, typed ports.

A step is data: an ``id``, its primitive ``kind``, the ``op`` that implements
it (a name in ``beamzoo.core.registry``), JSON parameters, the refs of its
inputs and placement hints. A ref is ``"step"`` (its ``out`` port),
``"step:port"`` (say a route's branch) or ``"@dead"`` (the dead letters of
every step). A composite's steps have ids under its own (``cascade/fast/infer``),
and the graph keeps each composite as a group with its input and output ports.

A ``Graph`` is checked when it is made: ids are unique, refs exist, there is
no cycle, each step's required fields fit what reaches it (tensor contracts
included), and no column is produced twice. It round-trips through JSON
exactly, and its fingerprint is a hash of what defines its results, the same
in every process. Graphs are built step by step with ``|``: each new step is
checked against what it reads, once, so building is linear in the steps.

>>> from beamzoo.transforms.sources import Files
>>> from beamzoo.transforms.io import ReadFiles
>>> g = (Graph.source(Files("imgs/*.jpg")) | ReadFiles()).graph
>>> [s.id for s in g.steps], g.schema("read").names
(['files', 'read'], ['id', 'path', 'data'])
>>> Graph.from_json(g.to_json()) == g
True
"""
from __future__ import annotations

import copy
import hashlib
import heapq
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from beamzoo.core.knobs import KnobError, bind, declare
from beamzoo.core.op import PRIMITIVES, Operator, check_placement
from beamzoo.core.registry import op_class
from beamzoo.core.schemas import DEAD_LETTER_SCHEMA, SchemaMismatchError, check_fits

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
    def of(cls, op: Operator, inputs: tuple[str, ...], id: str | None = None) -> Step:
        sid = id or op.id
        return cls(sid, op.kind, op.name, canonical(op.params, f"step {sid!r}'s parameters"),
                   tuple(inputs), tuple(check_placement(sid, op.placement).items()))

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def operator(self) -> Operator:
        """A fresh operator for this step (no heavy state until it is bound)."""
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

    @classmethod
    def from_dict(cls, d: dict) -> Step:
        return cls(d["id"], d["kind"], d["op"], canonical(d.get("params", {})), tuple(d.get("inputs", ())),
                   tuple(check_placement(d["id"], d.get("placement") or {}).items()))


@dataclass(frozen=True)
class Group:
    """A composite as the graph keeps it: its id (its steps' ids start with ``id/``), its type,
    the refs it read and the refs of its output ports."""

    id: str
    type: str
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "inputs": list(self.inputs), "outputs": dict(self.outputs)}

    @classmethod
    def from_dict(cls, d: dict) -> Group:
        return cls(d["id"], d["type"], tuple(d.get("inputs", ())), tuple(sorted(d.get("outputs", {}).items())))


def split_ref(ref: str) -> tuple[str, str]:
    step, _, port = ref.partition(":")
    return step, port or "out"


def full_ref(ref: str) -> str:
    return ref if ref == DEAD else "%s:%s" % split_ref(ref)


def _describe(s: Step) -> str:
    return f"{s.op} (reading {', '.join(s.inputs) or 'nothing'})"


class _Parts:
    """A graph under construction: its steps in order (dead-letter readers last), every port's
    schema and which step made each of its fields. Each added step is checked once."""

    def __init__(self):
        self.main: list[Step] = []
        self.tail: list[Step] = []  # steps reading @dead, and what reads them
        self.tail_ids: set[str] = set()
        self.by_id: dict[str, Step] = {}
        self.schemas: dict[str, pa.Schema] = {}
        self.origin: dict[str, dict[str, str]] = {}
        self.groups: list[Group] = []
        self.names: set[str] = set()  # step ids, their scopes, group ids: what a new name must avoid
        self._frozen: Graph | None = None

    def add(self, step: Step, op: Operator | None = None) -> None:
        """Check ``step`` (``op``: its operator, when at hand) against what it reads; append it."""
        _check_id(step, self.by_id)
        _check_refs(step, self.by_id)
        if step.kind in _ARITY:  # an unknown primitive: an executor refuses it by name
            self._ports(step, op if op is not None else step.operator())
        self._append(step)

    def _append(self, step: Step) -> None:
        if DEAD in step.inputs or any(split_ref(r)[0] in self.tail_ids for r in step.inputs if r != DEAD):
            self.tail.append(step)
            self.tail_ids.add(step.id)
        else:
            self.main.append(step)
        self.by_id[step.id] = step
        self._name(step.id)
        self._frozen = None

    def _name(self, name: str) -> None:
        parts = name.split("/")
        self.names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))

    def _ports(self, s: Step, op: Operator) -> None:
        ins = [DEAD_LETTER_SCHEMA if r == DEAD else self.schemas[full_ref(r)] for r in s.inputs]
        made_by = [{} if r == DEAD else self.origin[full_ref(r)] for r in s.inputs]
        if op.kind in ("map", "explode", "route", "sink"):
            check_fits(s.id, op.requires, ins[0])
        for name in op.produced(ins) if op.kind != "collect" else ():  # a collect checks its parents
            if name in ins[0].names and name not in op.consumes:
                raise GraphError(
                    f"column {name!r} is produced twice: by step {made_by[0].get(name, '?')!r} and by "
                    f"step {s.id!r}; give one of them other output names (e.g. prefix=...)")
        try:
            outs = op.output_schemas(ins)
        except SchemaMismatchError:
            raise
        except (TypeError, ValueError) as exc:
            if isinstance(exc, (GraphError, KnobError)):
                raise
            raise SchemaMismatchError(f"step {s.id!r} cannot take its input: {exc}") from None
        inherited = {k: v for m in made_by for k, v in m.items()}
        for port, schema in outs.items():
            ref = f"{s.id}:{port}"
            self.schemas[ref] = schema
            self.origin[ref] = {f.name: inherited.get(f.name, s.id) for f in schema}

    def absorb(self, other: _Parts) -> None:
        """Add the steps and groups of ``other`` that are not here (a shared id must be the very
        same step)."""
        for s in other.main + other.tail:
            mine = self.by_id.get(s.id)
            if mine is None:
                self._append(s)
                for port_ref in [r for r in other.schemas if split_ref(r)[0] == s.id]:
                    self.schemas[port_ref] = other.schemas[port_ref]
                    self.origin[port_ref] = other.origin[port_ref]
            elif mine != s:
                raise GraphError(f"step id {s.id!r} is used twice, for {_describe(mine)} and "
                                 f"{_describe(s)}; name one of them: \"other_name\" >> {s.op}(...)")
        for g in other.groups:
            if g not in self.groups:
                self.groups.append(g)
                self.names.add(g.id)
        self._frozen = None

    def unique(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``, ... whichever is free."""
        if name not in self.names:
            return name
        n = 2
        while f"{name}_{n}" in self.names:
            n += 1
        return f"{name}_{n}"

    def freeze(self) -> Graph:
        """The graph of every step here."""
        if self._frozen is None:
            self._frozen = Graph._trusted(tuple(self.main + self.tail), tuple(self.groups), dict(self.schemas),
                                          dict(self.origin))
        return self._frozen

    def upstream(self, ref: str) -> Graph:
        """The graph of the steps ``ref`` comes from (all of them for ``@dead``): what a stream's
        graph is, so two branches built from one stream stay two graphs."""
        if ref == DEAD:
            return self.freeze()
        keep: set[str] = set()
        todo = [split_ref(ref)[0]]
        while todo:
            sid = todo.pop()
            if sid in keep:
                continue
            keep.add(sid)
            step = self.by_id[sid]
            if DEAD in step.inputs:
                return self.freeze()
            todo += [split_ref(r)[0] for r in step.inputs]
        if len(keep) == len(self.by_id):
            return self.freeze()
        steps = tuple(s for s in self.main + self.tail if s.id in keep)
        groups = tuple(g for g in self.groups if all(split_ref(r)[0] in keep for _, r in g.outputs))
        schemas = {r: v for r, v in self.schemas.items() if split_ref(r)[0] in keep}
        origin = {r: v for r, v in self.origin.items() if split_ref(r)[0] in keep}
        return Graph._trusted(steps, groups, schemas, origin)


def _check_id(s: Step, by_id: dict) -> None:
    if not isinstance(s.id, str) or not s.id or ":" in s.id or s.id.startswith("@"):
        raise GraphError(f"step id {s.id!r} is not allowed (no ':' and no leading '@')")
    if s.id in by_id:
        raise GraphError(f"step id {s.id!r} is used twice, for {_describe(by_id[s.id])} and "
                         f"{_describe(s)}; give each step its own id")


def _check_refs(s: Step, by_id: dict) -> None:
    if s.kind not in _ARITY:
        return
    lo, hi = _ARITY[s.kind]
    if not lo <= len(s.inputs) <= hi:
        raise GraphError(f"step {s.id!r} ({s.kind}) takes {lo if lo == hi else f'{lo} to {hi}'} "
                         f"inputs, got {len(s.inputs)}")
    for ref in s.inputs:
        if ref != DEAD and split_ref(ref)[0] not in by_id:
            raise GraphError(f"step {s.id!r} reads {ref!r}, but there is no step {split_ref(ref)[0]!r}")


def _ordered(steps: tuple[Step, ...]) -> list[Step]:
    """The steps in a topological order, stable (the given order where it is one), with the
    steps that read dead letters, and what reads them, last; refuses duplicates and cycles."""
    by_id: dict[str, Step] = {}
    for s in steps:
        _check_id(s, by_id)
        by_id[s.id] = s
    index = {s.id: i for i, s in enumerate(steps)}
    readers: dict[str, list[str]] = {s.id: [] for s in steps}
    waiting = {}
    for s in steps:
        _check_refs(s, by_id)
        deps = {split_ref(r)[0] for r in s.inputs if r != DEAD} if s.kind in _ARITY else set()
        waiting[s.id] = len(deps)
        for d in deps:
            readers[d].append(s.id)
    ready = [index[i] for i, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[Step] = []
    while ready:
        s = steps[heapq.heappop(ready)]
        order.append(s)
        for r in readers[s.id]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, index[r])
    if len(order) != len(steps):
        left = sorted(i for i, n in waiting.items() if n > 0)
        raise GraphError(f"the graph has a cycle through steps {', '.join(left)}")
    tail: set[str] = set()
    for s in order:
        if DEAD in s.inputs or any(split_ref(r)[0] in tail for r in s.inputs if r != DEAD):
            tail.add(s.id)
    return [s for s in order if s.id not in tail] + [s for s in order if s.id in tail]


@dataclass(frozen=True)
class Graph:
    """An immutable, checked DAG of steps (in a topological order) and its composites."""

    steps: tuple[Step, ...]
    groups: tuple[Group, ...] = ()
    schemas: dict = field(default=None, repr=False, compare=False, hash=False)

    def __post_init__(self):
        parts = _Parts()
        for s in _ordered(tuple(self.steps)):
            parts.add(s)
        for g in self.groups:
            for ref in (*g.inputs, *(r for _, r in g.outputs)):
                if ref != DEAD and split_ref(ref)[0] not in parts.by_id:
                    raise GraphError(f"composite {g.id!r} refers to {ref!r}, which is no step of the graph")
        object.__setattr__(self, "steps", tuple(parts.main + parts.tail))
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "schemas", parts.schemas)
        object.__setattr__(self, "_origin", parts.origin)

    @classmethod
    def _trusted(cls, steps: tuple[Step, ...], groups: tuple[Group, ...], schemas: dict, origin: dict) -> Graph:
        """A graph of steps already checked and ordered (by ``_Parts``)."""
        g = object.__new__(cls)
        object.__setattr__(g, "steps", steps)
        object.__setattr__(g, "groups", groups)
        object.__setattr__(g, "schemas", schemas)
        object.__setattr__(g, "_origin", origin)
        return g

    @staticmethod
    def source(op: Operator) -> Stream:
        """Start a graph from a source operator; returns its output stream."""
        return GraphBuilder() | op

    def _index(self) -> dict:
        idx = self.__dict__.get("_idx")
        if idx is None:
            readers: dict[str, list[Step]] = {}
            for s in self.steps:
                for r in s.inputs:
                    readers.setdefault(full_ref(r), []).append(s)
            idx = ({s.id: s for s in self.steps}, readers)
            object.__setattr__(self, "_idx", idx)
        return idx

    def step(self, id: str) -> Step:
        try:
            return self._index()[0][id]
        except KeyError:
            raise KeyError(f"no step {id!r} in the graph") from None

    def schema(self, ref: str) -> pa.Schema:
        """The schema of the rows at ``ref``."""
        return DEAD_LETTER_SCHEMA if ref == DEAD else self.schemas[full_ref(ref)]

    def consumers(self, ref: str) -> list[Step]:
        """The steps that read ``ref``."""
        return list(self._index()[1].get(full_ref(ref), ()))

    def union(self, other: Graph) -> Graph:
        """Both graphs' steps; a shared id must be the very same step."""
        parts = _parts_of(self)
        parts.absorb(_parts_of(other))
        return parts.freeze()

    def to_json(self) -> str:
        data = {"beamzoo_graph": FORMAT, "steps": [s.to_dict() for s in self.steps]}
        if self.groups:
            data["groups"] = [g.to_dict() for g in self.groups]
        return json.dumps(data, sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Graph:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("beamzoo_graph") != FORMAT:
            got = data.get("beamzoo_graph") if isinstance(data, dict) else type(data).__name__
            raise GraphError(f"not a beamzoo graph of format {FORMAT} (got {got!r})")
        return cls(tuple(Step.from_dict(d) for d in data["steps"]),
                   tuple(Group.from_dict(g) for g in data.get("groups", ())))

    def fingerprint(self, kinds: tuple[str, ...] = PRIMITIVES) -> str:
        """sha256 of what defines the results: each step's kind, op, inputs and the knobs
        that change results (not batch sizes or threads). ``kinds`` limits it to some
        primitives (resume keys leave out sources and sinks: where files are read from and
        written to does not change a row)."""
        text = canonical([{"id": s.id, "kind": s.kind, "op": s.op, "inputs": list(s.inputs),
                           "params": s.operator().result_params()}
                          for s in self.steps if s.kind in kinds])
        return hashlib.sha256(text.encode()).hexdigest()


def _parts_of(graph: Graph) -> _Parts:
    p = _Parts()
    for s in graph.steps:
        p._append(s)
    p.schemas = dict(graph.schemas)
    p.origin = dict(graph._origin)
    p.groups = list(graph.groups)
    p.names.update(g.id for g in graph.groups)
    return p


# ------------------------------------------------------------------ building graphs with |

class GraphBuilder:
    """Where a graph is built: ``builder | source`` starts a stream, ``stream | op`` adds a
    step, sinks end streams. Every stream of one builder adds to the same graph."""

    def __init__(self):
        self._parts = _Parts()

    @property
    def graph(self) -> Graph | None:
        return self._parts.freeze() if self._parts.by_id else None

    def __or__(self, source) -> Stream:
        if not isinstance(source, Operator):
            raise GraphError(f"start a pipeline with a beamzoo source (Files, Manifest, Rows), got {source!r}")
        if source.kind != "source":
            raise GraphError(f"{source!r} is a {source.kind}, not a source; start a pipeline with a source "
                             "(Files, Manifest, Rows)")
        return _add(source, [], self._parts, ())

    @property
    def dead_letters(self) -> Stream:
        """The dead letters of every step (``id``, ``source``, ``stage``, ``error``, ``key``)."""
        if not self._parts.by_id:
            raise GraphError("start the pipeline with a source before asking for its dead letters")
        return Stream(self._parts, DEAD, ())


class Stream:
    """A port of a graph under construction: ``stream | op`` adds a step after it."""

    is_stream = True  # what an operator asks of ``(a, b) | op``

    def __init__(self, parts: _Parts, ref: str, scope: tuple[str, ...] = ()):
        self._parts, self.ref, self.scope = parts, ref, scope

    @property
    def graph(self) -> Graph:
        """The steps this stream comes from."""
        return self._parts.upstream(self.ref)

    @property
    def schema(self) -> pa.Schema:
        return DEAD_LETTER_SCHEMA if self.ref == DEAD else self._parts.schemas[full_ref(self.ref)]

    def __or__(self, other):
        if isinstance(other, Composite):
            return _expand(other, self)
        if isinstance(other, Operator):
            return apply(other, [self])
        raise TypeError(f"a graph step must be a beamzoo operator or composite, got {other!r}")

    def join(self, op: Operator, streams: list[Stream]):
        """``(a, b) | op``: a step reading several streams."""
        return apply(op, streams)

    def __repr__(self):
        return f"Stream({self.ref!r}: {', '.join(self.schema.names)})"


class Ports:
    """The named output ports of a step, e.g. a route's branches: ``ports.low`` / ``ports["low"]``."""

    def __init__(self, streams: dict[str, Stream]):
        self._streams = streams

    def __getitem__(self, name: str) -> Stream:
        return self._streams[name]

    def __getattr__(self, name: str) -> Stream:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._streams[name]
        except KeyError:
            raise AttributeError(f"no port {name!r}; ports: {', '.join(self._streams)}") from None

    def __iter__(self):
        return iter(self._streams.values())

    def items(self):
        return self._streams.items()


@dataclass(frozen=True)
class Sunk:
    """What applying a sink returns: the graph that now ends in it."""

    graph: Graph


def _scoped(scope: tuple[str, ...], name: str) -> str:
    return "/".join((*scope, name))


def apply(op: Operator, inputs: list[Stream]) -> Stream | Ports | Sunk:
    """Add ``op`` reading ``inputs``; returns its output stream (or ports)."""
    if op.kind == "source":
        raise GraphError(f"{op!r} is a source: start a pipeline with it (pipeline | {type(op).__name__}(...))")
    parts = inputs[0]._parts
    for s in inputs[1:]:
        if s._parts is not parts:
            parts.absorb(s._parts)
            s._parts = parts
    return _add(op, inputs, parts, inputs[0].scope)


def _add(op: Operator, inputs: list[Stream], parts: _Parts, scope: tuple[str, ...]):
    sid = _scoped(scope, op.id)
    refs = tuple(s.ref for s in inputs)
    if not op.named:
        sid = parts.unique(sid)
    step = Step.of(op, refs, sid)
    if op.named and parts.by_id.get(sid) == step:  # the very same step again
        return _outputs(op, parts, sid, scope)
    checked = copy.copy(op)
    checked.id = sid  # errors name the step's own id
    parts.add(step, checked)
    return _outputs(op, parts, sid, scope)


def _outputs(op: Operator, parts: _Parts, sid: str, scope: tuple[str, ...]):
    ports = op.ports
    if not ports:  # a sink
        return Sunk(parts.upstream(sid))
    if len(ports) == 1:
        return Stream(parts, sid if ports[0] == "out" else f"{sid}:{ports[0]}", scope)
    return Ports({p: Stream(parts, f"{sid}:{p}", scope) for p in ports})


def _expand(comp: Composite, stream: Stream):
    parts = stream._parts
    name = _scoped(stream.scope, comp.id)
    if not comp.named:
        name = parts.unique(name)
    elif name in parts.names:
        raise GraphError(f"composite id {name!r} is used twice; give each composite its own id")
    parts.names.add(name)
    out = comp.expand(Stream(parts, stream.ref, tuple(name.split("/"))))
    streams = dict(out.items()) if isinstance(out, Ports) else {"out": out}
    missing = [p for p in comp.outputs if p not in streams]
    if missing or not all(isinstance(s, Stream) for s in streams.values()):
        raise GraphError(f"composite {type(comp).__name__} must give its output ports "
                         f"{', '.join(comp.outputs)}, gave {', '.join(streams) or 'none'}")
    parts.groups.append(Group(name, type(comp).__name__, (stream.ref,),
                              tuple(sorted((p, s.ref) for p, s in streams.items()))))
    parts._frozen = None
    back = {p: Stream(parts, s.ref, stream.scope) for p, s in streams.items()}
    return back["out"] if list(back) == ["out"] else Ports(back)


class Composite:
    """A reusable piece of graph: ``expand(stream)`` adds steps and returns the stream out
    (or ``Ports``). Its knobs are declared as an operator's are (``knobs``,
    ``positional``); its steps get ids under its own (``classify/read``), and a graph
    may hold any number of the same composite: unnamed ones are numbered
    (``classify``, ``classify_2``). ``inputs`` and ``outputs`` name its ports.
    """

    default_id = "composite"
    knobs: dict = {}
    positional: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ("in",)
    outputs: tuple[str, ...] = ("out",)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        declare(cls)

    def __init__(self, *args, id: str | None = None, **params):
        self.params = bind(type(self).__name__, self.knobs, self.positional, args, params)
        self.id = id or self.default_id
        self.named = id is not None
        if not isinstance(self.id, str) or not self.id or ":" in self.id or "/" in self.id:
            raise GraphError(f"composite id {self.id!r} is not allowed (no ':' or '/')")
        self.configure()

    def configure(self) -> None:
        """Derive settings from ``self.params`` (load a card, check the models fit)."""

    def expand(self, stream: Stream) -> Stream | Ports:
        raise NotImplementedError

    def __rrshift__(self, label: str) -> Composite:
        if not isinstance(label, str):
            return NotImplemented
        other = copy.copy(self)
        other.id, other.named = label, True
        return other


__all__ = ["Composite", "DEAD", "FORMAT", "Graph", "GraphBuilder", "GraphError", "Group", "Ports", "Step",
           "Stream", "Sunk", "apply", "canonical", "full_ref", "split_ref"]

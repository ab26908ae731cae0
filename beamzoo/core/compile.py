"""The compiler: a logical graph -> a plan of stages for an executor.

Compiling is a list of passes, each a function from graph to graph, then
staging. Every pass rewrites through ``rewire``, which changes only the
inputs of the steps it keeps, so no pass can drop a step's parameters or its
placement, and ``derived`` places a new step where the step it stands for
was. Each executor chooses its passes (``Executor.passes``): resume keying,
serving's request source and response sink, the ops' own fusion rules
(``fuse_rules``: a decode read only by a resize becomes one step with the
same pixels); ``stages`` then fuses chains of row-parallel maps of one
placement into one stage, which an executor runs as one task per batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from beamzoo.core.graph import DEAD, Graph, Group, Step, full_ref, split_ref
from beamzoo.core.op import PRIMITIVES, Operator
from beamzoo.core.registry import op_class

Pass = Callable[[Graph], Graph]


@dataclass(frozen=True)
class Stage:
    """Steps run together: several only for fused maps. ``inputs`` are refs to other
    stages' ports (``stage:port``) or ``@dead``."""

    id: str
    kind: str
    steps: tuple[Step, ...]
    inputs: tuple[str, ...]
    parallel: bool

    def operators(self) -> list[Operator]:
        return [s.operator() for s in self.steps]

    @property
    def placement(self) -> dict:
        """The hints of its steps (a stage never spans two placements)."""
        return dict(self.steps[0].placement)


@dataclass(frozen=True)
class Plan:
    graph: Graph
    stages: tuple[Stage, ...]
    moved: tuple[tuple[str, str], ...] = ()  # refs of the logical graph that passes moved: (old, new)

    def consumers(self, stage: Stage, port: str = "out") -> list[Stage]:
        ref = f"{stage.id}:{port}"
        return [s for s in self.stages if ref in s.inputs]

    def dead_readers(self) -> list[Stage]:
        return [s for s in self.stages if DEAD in s.inputs]

    def stage_port(self, ref: str) -> str:
        """The stage port (``stage:port``) that carries a logical ref's rows."""
        ref = full_ref(ref)
        for old, new in self.moved:
            if ref == old:
                ref = new
        step, port = split_ref(ref)
        for stage in self.stages:
            if any(s.id == step for s in stage.steps):
                if stage.steps[-1].id != step and stage.kind == "map":
                    raise KeyError(f"{ref} is inside stage {stage.id!r}, not at its end")
                return f"{stage.id}:{port}"
        raise KeyError(f"no stage carries {ref}")

    def layout(self) -> list[dict]:
        """The stages as JSON data: id, kind, steps, placement."""
        return [{"stage": s.id, "kind": s.kind, "steps": [st.id for st in s.steps], "placement": s.placement,
                 "parallel": s.parallel} for s in self.stages]


def derived(op: Operator, inputs: tuple[str, ...], like: Step) -> Step:
    """A new step for ``op`` reading ``inputs``, placed where ``like`` is (unless ``op`` has
    hints of its own)."""
    step = Step.of(op, inputs)
    return step if step.placement else Step(step.id, step.kind, step.op, step.params_json, step.inputs,
                                           like.placement)


def rewire(graph: Graph, drop: set[str] = frozenset(), add: list[Step] = (),
           moves: dict[str, str] | None = None, reads: dict[str, tuple[str, ...]] | None = None) -> Graph:
    """``graph`` without the steps ``drop`` names, with the steps ``add`` (each placed after what
    it reads), with every kept step's refs in ``moves`` ({old ref: new ref}) moved, and the
    steps ``reads`` names reading what it says ({step id: its new inputs}). A kept step
    changes only its inputs: its parameters and placement stay as they are."""
    moves = {full_ref(k): _short(v) for k, v in (moves or {}).items()}
    reads = reads or {}
    kept = []
    for s in graph.steps:
        if s.id in drop:
            continue
        inputs = tuple(reads[s.id]) if s.id in reads else \
            tuple(moves.get(full_ref(r), r) if r != DEAD else r for r in s.inputs)
        kept.append(s if inputs == s.inputs else Step(s.id, s.kind, s.op, s.params_json, inputs, s.placement))
    ids = {s.id for s in kept} | {s.id for s in add}

    def moved(refs):
        return tuple(moves.get(full_ref(r), r) if r != DEAD else r for r in refs)

    groups = []  # a composite whose ports no longer exist is no longer a group
    for g in graph.groups:
        group = Group(g.id, g.type, moved(g.inputs), tuple((p, moved((r,))[0]) for p, r in g.outputs))
        if all(r == DEAD or split_ref(r)[0] in ids for r in (*group.inputs, *(r for _, r in group.outputs))):
            groups.append(group)
    out = Graph(tuple(kept) + tuple(add), tuple(groups))
    object.__setattr__(out, "_moved", (*getattr(graph, "_moved", ()),
                                       *((k, full_ref(v)) for k, v in moves.items())))
    return out


def _short(ref: str) -> str:
    """A ref as steps write it: ``step`` for its ``out`` port."""
    return ref[:-4] if ref.endswith(":out") else ref


def _only_reader(graph: Graph, step: Step) -> Step | None:
    readers = graph.consumers(step.id)
    if len(readers) == 1 and tuple(map(full_ref, readers[0].inputs)) == (f"{step.id}:out",) \
            and readers[0].kind == step.kind == "map" and readers[0].placement == step.placement:
        return readers[0]
    return None


def fuse_rules(graph: Graph) -> Graph:
    """Apply the ops' own fusion rules (``Operator.fuse``) until none matches: a step whose only
    reader is a map of the same placement reading nothing else, and whose op fuses with it,
    becomes one step."""
    changed = True
    while changed:
        changed = False
        for a in graph.steps:
            if a.kind not in PRIMITIVES or op_class(a.op).fuse is Operator.fuse:
                continue  # the op registers no rule
            b = _only_reader(graph, a)
            fused = a.operator().fuse(b.operator()) if b is not None else None
            if fused is None:
                continue
            step = derived(fused, a.inputs, like=a)
            graph = rewire(graph, drop={a.id, b.id}, add=[step], moves={f"{b.id}:out": f"{step.id}:out"})
            changed = True
            break
    return graph


def stages(graph: Graph) -> Plan:
    """Fuse chains of row-parallel maps of one placement into stages (placement-aware staging)."""
    parallel = {s.id: s.kind in PRIMITIVES and s.kind != "source" and s.operator().parallel for s in graph.steps}
    stage_of: dict[str, str] = {}  # step id -> the stage it runs in
    chains: list[list[Step]] = []
    ending: dict[str, list[Step]] = {}  # step id -> the chain it ends (branches interleave in the order)
    for s in graph.steps:
        prev = split_ref(s.inputs[0])[0] if len(s.inputs) == 1 and s.inputs[0] != DEAD else None
        head = ending.get(prev)
        if (s.kind == "map" and head is not None and head[-1].kind == "map"
                and split_ref(s.inputs[0])[1] == "out" and _only_reader(graph, head[-1]) is s
                and parallel[prev] == parallel[s.id]):
            head.append(s)
        else:
            head = [s]
            chains.append(head)
        ending[s.id] = head
        stage_of[s.id] = head[0].id
    out = []
    for chain in chains:
        first = chain[0]
        inputs = tuple(r if r == DEAD else f"{stage_of[split_ref(r)[0]]}:{split_ref(r)[1]}" for r in first.inputs)
        out.append(Stage(first.id, first.kind, tuple(chain), inputs, all(parallel[s.id] for s in chain)))
    return Plan(graph, tuple(out), tuple(getattr(graph, "_moved", ())))


STANDARD: tuple[Pass, ...] = (fuse_rules,)


def compile(graph: Graph, passes: tuple[Pass, ...] = STANDARD) -> Plan:  # noqa: A001 - what it does
    """Run ``passes`` over ``graph`` in order, then stage it."""
    for p in passes:
        graph = p(graph)
    return stages(graph)


class UnknownPrimitive(ValueError):
    """An executor met a step kind it has no kernel for."""


def check_kinds(plan: Plan, kinds, executor: str) -> None:
    for stage in plan.stages:
        if stage.kind not in kinds:
            raise UnknownPrimitive(f"{executor} cannot run step {stage.steps[0].id!r}: unknown primitive "
                                   f"{stage.kind!r} (it runs {', '.join(sorted(kinds))})")


__all__ = ["Pass", "Plan", "STANDARD", "Stage", "UnknownPrimitive", "check_kinds", "compile", "derived",
           "fuse_rules", "rewire", "stages"]

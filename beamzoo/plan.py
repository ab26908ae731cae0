"""The planner: a logical graph -> stages for an executor.

Rules rewrite pairs of steps (a decode read only by a resize becomes one
``decode_resize`` step, with the same pixels); then chains of row-parallel
maps fuse into one stage, which a runner runs as one task per batch. Each
runner has a table from primitive kind to how it runs a stage, and refuses
a kind it does not know by name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from beamzoo.core import PRIMITIVES as KINDS
from beamzoo.graph import DEAD, Graph, Step, split_ref


@dataclass(frozen=True)
class Stage:
    """Steps run together: several only for fused maps. ``inputs`` are refs to other
    stages' ports (``stage:port``) or ``@dead``."""

    id: str
    kind: str
    steps: tuple[Step, ...]
    inputs: tuple[str, ...]
    parallel: bool

    def operators(self):
        return [s.operator() for s in self.steps]

    @property
    def placement(self) -> dict:
        """The hints of its steps (a stage never spans two placements)."""
        return dict(self.steps[0].placement)


@dataclass(frozen=True)
class Plan:
    graph: Graph
    stages: tuple[Stage, ...]

    def consumers(self, stage: Stage, port: str = "out") -> list[Stage]:
        ref = f"{stage.id}:{port}"
        return [s for s in self.stages if ref in s.inputs]

    def dead_readers(self) -> list[Stage]:
        return [s for s in self.stages if DEAD in s.inputs]


def run_fused(ops, batch, on_piece, on_skipped):
    """A fused map stage's operators on ``batch``, in order; yields what comes out of
    the last. A step may hand on its output in pieces, each through the rest before the
    next is made. For each piece ``on_piece(op, rows, dead)`` is called and what it
    yields is yielded too (a runner's dead-letter outputs); rows a step drops without a
    dead letter (resume) go to ``on_skipped(n)``, once per batch and step."""
    if not ops or batch.num_rows == 0:
        if batch.num_rows:
            yield batch
        return
    n = batch.num_rows
    for piece, dead in ops[0].process_pieces(batch):
        yield from on_piece(ops[0], piece, dead)
        n -= piece.num_rows + dead.num_rows
        yield from run_fused(ops[1:], piece, on_piece, on_skipped)
    if n:
        on_skipped(n)


class UnknownPrimitive(ValueError):
    """A runner met a step kind it has no plan function for."""


def check_kinds(plan: Plan, table, runner: str) -> None:
    for stage in plan.stages:
        if stage.kind not in table:
            raise UnknownPrimitive(f"{runner} cannot run step {stage.steps[0].id!r}: unknown primitive "
                                   f"{stage.kind!r} (it runs {', '.join(sorted(table))})")


def _fuse_decode_resize(a: Step, b: Step) -> Step | None:
    if (a.op, b.op) != ("decode_image", "resize_crop") or a.placement != b.placement:
        return None
    from beamzoo.transforms.preprocess import fuse_decode_resize
    fused = fuse_decode_resize(a.operator(), b.operator())
    return None if fused is None else replace(Step.of(fused, a.inputs), placement=a.placement)


RULES = (_fuse_decode_resize,)


def _only_reader(graph: Graph, step: Step) -> Step | None:
    readers = graph.consumers(step.id)
    if len(readers) == 1 and readers[0].inputs == (step.id,) and readers[0].kind == step.kind == "map":
        return readers[0]
    return None


def rewrite(graph: Graph) -> Graph:
    """Apply the rules until none matches."""
    changed = True
    while changed:
        changed = False
        for a in graph.steps:
            b = _only_reader(graph, a)
            fused = next((f for f in (rule(a, b) for rule in RULES) if f is not None), None) if b else None
            if fused is None:
                continue
            steps = []
            for s in graph.steps:
                if s is a:
                    steps.append(fused)
                elif s is not b:
                    steps.append(replace(s, inputs=tuple(fused.id if split_ref(r) == (b.id, "out") else r
                                                         for r in s.inputs)))
            graph, changed = Graph(tuple(steps)), True
            break
    return graph


def plan(graph: Graph) -> Plan:
    graph = rewrite(graph)
    parallel = {s.id: s.kind in KINDS and s.operator().parallel for s in graph.steps}
    stage_of: dict[str, str] = {}  # step id -> the stage it runs in
    chains: list[list[Step]] = []
    ending: dict[str, list[Step]] = {}  # step id -> the chain it ends (branches interleave in the order)
    for s in graph.steps:
        prev = split_ref(s.inputs[0])[0] if len(s.inputs) == 1 and s.inputs[0] != DEAD else None
        head = ending.get(prev)
        if (s.kind == "map" and head is not None and head[-1].kind == "map"
                and split_ref(s.inputs[0])[1] == "out" and _only_reader(graph, head[-1]) is s
                and parallel[prev] == parallel[s.id] and head[-1].placement == s.placement):
            head.append(s)
        else:
            head = [s]
            chains.append(head)
        ending[s.id] = head
        stage_of[s.id] = head[0].id
    stages = []
    for chain in chains:
        first = chain[0]
        inputs = tuple(r if r == DEAD else f"{stage_of[split_ref(r)[0]]}:{split_ref(r)[1]}"
                       for r in first.inputs)
        stages.append(Stage(first.id, first.kind, tuple(chain), inputs, all(parallel[s.id] for s in chain)))
    return Plan(graph, tuple(stages))

"""Following a model's newest version while a run goes on (``OnnxInference``'s ``model_refresh``).

A step whose ``model_refresh`` is set answers each batch with the newest
version of its model's name that verifies and fits the graph it was built in
(same inputs, outputs, labels and preprocessing); ``ANSWERED_BY`` carries the
version that answered each row to the step that writes the ``model`` column.
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable

from beamzoo.core.context import RunContext
from beamzoo.core.knobs import Knob
from beamzoo.zoo import ModelCard, get, versions
from beamzoo.zoo.repository import version_key

ANSWERED_BY = "answered_by"  # the column saying which model version answered a row (with model_refresh)
MODEL_REFRESH = Knob(None, float, low=0.0, unit="seconds",
                     doc="look for a newer version of the model's name in the zoo at most this often (seconds; "
                         "0: before every batch) and answer with it once it verifies and has the same inputs, "
                         "outputs, labels and preprocessing (one long-lived process: the edge runner)")


def followed(card: ModelCard) -> dict:
    """What a step that follows ``card``'s name is, for fingerprints: the card's identity but
    its version and file, which the versions it may move to share (so a resumed run knows the
    rows any of them answered)."""
    return {k: v for k, v in card.identity().items() if k not in ("version", "sha256")}


def _signature(tensors) -> str:
    return ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in tensors)


def _mismatch(new: ModelCard, old: ModelCard) -> str | None:
    """Why ``new`` cannot answer in place of ``old`` (the steps around it and the graph's schema
    were made for ``old``), or None."""
    if new.inputs != old.inputs:
        return f"{new.ref} has other inputs ({_signature(new.inputs)}) than {old.ref} ({_signature(old.inputs)})"
    if new.outputs != old.outputs:
        return f"{new.ref} has other outputs ({_signature(new.outputs)}) than {old.ref} ({_signature(old.outputs)})"
    if new.labels != old.labels:
        return f"{new.ref} has other labels than {old.ref}"
    if new.preprocess != old.preprocess:
        return f"{new.ref} has other preprocessing ({new.preprocess}) than {old.ref} ({old.preprocess})"
    return None


class ModelRefresh:
    """The version of one step's model that answers now, for every thread of the step in one run.

    At most every ``every`` seconds of the run's clock, ``current`` lists the versions of the
    model's name in the zoo; a newer one than the running version is loaded (its card verified:
    the file's sha256, its signature, that onnxruntime loads it) and answers from the next batch
    on if its inputs, outputs, labels and preprocessing are the running version's. Otherwise the
    running version keeps answering, and why is said once: a run note and a line on stderr.
    The run's notes keep ``models`` (the versions that answered, in order) and ``refused``.
    """

    def __init__(self, step: str, card: ModelCard, session: Any, make: Callable[[ModelCard], Any],
                 every: float, ctx: RunContext):
        self.step, self.card, self.session, self.make = step, card, session, make
        self.every, self.ctx = every, ctx
        self.checked = ctx.now()
        self.busy = False  # one thread looks at a time; the others keep answering meanwhile
        self.models = [card.ref]
        self.refused: dict[str, str] = {}
        self.lock = threading.Lock()
        ctx.note(step, "models", list(self.models))

    def current(self) -> tuple[ModelCard, Any]:
        """The card and session that answer the next batch."""
        with self.lock:
            now = self.ctx.now()
            due = not self.busy and now - self.checked >= self.every
            if due:
                self.busy, self.checked = True, now
        if due:
            try:
                self._look()
            finally:
                with self.lock:
                    self.busy = False
        with self.lock:
            return self.card, self.session

    def _look(self) -> None:
        running = self.card
        try:
            have = versions(running.name)
        except Exception as exc:  # noqa: BLE001 - a repository being edited: say so, keep answering
            self._refuse(f"zoo:{running.name}", f"the zoo's repositories cannot be listed ({exc})", running)
            return
        if not have:
            self._refuse(f"zoo:{running.name}", f"no repository of the zoo has a model named {running.name!r}",
                         running)
            return
        newest = f"{running.name}:{have[-1]}"
        if version_key(have[-1]) <= version_key(running.version) or newest in self.refused:
            return
        try:
            card = get(newest)
        except Exception as exc:  # noqa: BLE001 - a card that does not verify never answers
            self._refuse(newest, f"{newest} does not verify: {' '.join(str(exc).split())}", running)
            return
        problem = _mismatch(card, running)
        if problem is None:
            try:
                session = self.make(card)
            except Exception as exc:  # noqa: BLE001
                problem = f"{newest} cannot be loaded: {' '.join(str(exc).split())}"
        if problem is not None:
            self._refuse(newest, problem, running)
            return
        with self.lock:
            self.card, self.session = card, session
            self.models.append(card.ref)
            self.ctx.note(self.step, "models", list(self.models))
        _say(f"step {self.step!r} answers with {card.ref} from now on (was {running.ref})")

    def _refuse(self, what: str, reason: str, running: ModelCard) -> None:
        with self.lock:
            if what in self.refused:
                return
            self.refused[what] = reason
            self.ctx.note(self.step, "refused", dict(self.refused))
        _say(f"step {self.step!r}: {reason}; keeping {running.ref}")


def _say(line: str) -> None:
    print(f"model_refresh: {line}", file=sys.stderr, flush=True)


# run context -> {step id: its ModelRefresh}: the threads of a step share one, and it goes with the run
_refreshes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_refreshes_lock = threading.Lock()


def refresh_of(ctx: RunContext, step: str, make: Callable[[], ModelRefresh]) -> ModelRefresh:
    with _refreshes_lock:
        steps = _refreshes.setdefault(ctx, {})
        if step not in steps:
            steps[step] = make()
        return steps[step]


__all__ = ["ANSWERED_BY", "MODEL_REFRESH", "ModelRefresh", "followed", "refresh_of"]

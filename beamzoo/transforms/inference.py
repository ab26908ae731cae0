"""ONNX Runtime inference as an operator, optionally following its model's newest version."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core.knobs import Knob, KnobError
from beamzoo.core.op import NO_DEAD_LETTERS, Operator, Result, dead_letters, error_text, with_columns
from beamzoo.core.schemas import tensor_array
from beamzoo.transforms.model import INTRA_OP_THREADS, MODEL
from beamzoo.transforms.refresh import ANSWERED_BY, MODEL_REFRESH, ModelRefresh, followed, refresh_of
from beamzoo.zoo import ModelCard, card_of, model_bytes
from beamzoo.zoo.verify import not_loadable

_OPT_LEVELS = ("disable", "basic", "extended", "all")



def _session(card: ModelCard, threads: int, inter: int, optimization: str, spin: bool,
             providers: tuple[str, ...]):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = inter
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.log_severity_level = 4  # a failed run raises, and becomes a dead letter with the reason: no log lines
    opts.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel,
        {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
         "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}[optimization])
    # The bytes whose sha256 and signature were checked are the bytes the session is made of.
    data = model_bytes(card)
    try:
        return ort.InferenceSession(data, opts, providers=list(providers))
    except Exception as exc:  # custom operators, an opset it does not know: the card's problem
        raise not_loadable(card, data, exc) from None


def _available(asked: tuple[str, ...]) -> tuple[str, ...]:
    """Of the providers asked for, those this onnxruntime has (the CPU's always)."""
    import onnxruntime as ort
    have = set(ort.get_available_providers())
    return tuple(p for p in asked if p in have) or ("CPUExecutionProvider",)


class OnnxInference(Operator):
    """tensors -> tensors with onnxruntime, ``batch_size`` rows per run.

    A model with one input and one output reads ``input_field`` (default
    "pixels") and writes ``output_field`` (default "logits"). A model with
    several reads and writes columns named after its tensors, or as
    ``inputs`` / ``outputs`` map them ({tensor name: column}); ``outputs``
    may name a subset. Knobs: ``intra_op_threads`` and ``inter_op_threads``
    (0 = onnxruntime's default: all cores), ``optimization`` ("disable",
    "basic", "extended", "all"), ``spin`` (let idle onnxruntime threads spin;
    off, since decoding wants those cores), ``providers`` (e.g.
    ["CUDAExecutionProvider", "CPUExecutionProvider"]). With one intra-op
    thread the step may run in several threads at once, one session per
    process shared by all. ``keep_input`` keeps the input columns (a cascade
    feeds them to a second model). A batch that fails is retried row by row
    so only the bad rows dead-letter.

    ``model_refresh`` (seconds) follows the model's name: a newer version in
    the zoo answers from the next batch on, once its card verifies and its
    inputs, outputs, labels and preprocessing are those of the version running
    (``ModelRefresh``); each row's ``answered_by`` says which version answered
    it (TopK's ``model_field`` reads it). Only an executor that runs the graph
    in one long-lived process honours it (the edge runner, the in-thread one).
    """

    name = "onnx_infer"
    default_id = "infer"
    knobs = {
        "model": MODEL,
        "input_field": Knob("pixels", str, doc="the column a one-input model reads"),
        "output_field": Knob("logits", str, doc="the column a one-output model writes"),
        "inputs": Knob(None, dict, doc="{model input: column}, for a model with several inputs"),
        "outputs": Knob(None, dict, doc="{model output: column}: the outputs to keep and their columns"),
        "keep_input": Knob(False, bool, doc="keep the input columns (a cascade feeds them to a second model)"),
        "batch_size": Knob(4, int, low=1, high=65536, results=False, doc="images per inference call",
                           tune=(1, 2, 4, 8, 16, 32)),
        "intra_op_threads": INTRA_OP_THREADS,
        "inter_op_threads": Knob(0, int, low=0, high=1024, results=False, doc="onnxruntime inter-op threads"),
        "optimization": Knob("all", str, choices=_OPT_LEVELS, results=False, doc="onnxruntime graph optimizations"),
        "spin": Knob(False, bool, results=False, doc="let idle onnxruntime threads spin"),
        "providers": Knob(None, list, results=False, doc="onnxruntime execution providers, in order"),
        "model_refresh": MODEL_REFRESH,
    }
    positional = ("model",)

    def configure(self):
        p = self.params
        self.card = card = card_of(p["model"])
        self.feeds = self._columns("inputs", card.inputs, p["inputs"], p["input_field"], every=True)
        self.fetches = self._columns("outputs", card.outputs, p["outputs"], p["output_field"], every=False)
        specs = {t.name: t.spec for t in (*card.inputs, *card.outputs)}
        for name in (*self.feeds, *self.fetches):
            if not specs[name].fixed:
                raise KnobError(f"OnnxInference: tensor {name!r} of {card.ref} has a dynamic shape "
                                f"{list(specs[name].shape)}; this step feeds and returns fixed-shape tensor columns")
        self.input_field, self.output_field = p["input_field"], p["output_field"]
        self.batch_size = p["batch_size"]
        self.parallel = p["intra_op_threads"] == 1
        self.requires = pa.schema([specs[t].field(c) for t, c in self.feeds.items()])
        self.refresh = p["model_refresh"]
        answered_by = [pa.field(ANSWERED_BY, pa.string())] if self.refresh is not None else []
        self.produces = pa.schema([specs[t].field(c) for t, c in self.fetches.items()] + answered_by)
        self.consumes = () if p["keep_input"] else tuple(self.feeds.values())
        self._out_specs = [specs[t] for t in self.fetches]
        self._session = None
        self._refresh = None

    def _columns(self, kind, tensors, given, single, every) -> dict[str, str]:
        names = [t.name for t in tensors]
        if given is None:
            return {names[0]: single} if len(names) == 1 else {n: n for n in names}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise KnobError(f"OnnxInference: {kind} names {unknown[0]!r}, which {self.card.ref} does not "
                            f"have; its {kind}: {', '.join(names)}")
        if every and set(given) != set(names):
            missing = sorted(set(names) - set(given))
            raise KnobError(f"OnnxInference: {kind} must map every input of {self.card.ref}; missing: "
                            f"{', '.join(missing)}")
        if not given:
            raise KnobError(f"OnnxInference: {kind} maps nothing; name at least one of {', '.join(names)}")
        if len(set(given.values())) != len(given) or not all(isinstance(c, str) and c for c in given.values()):
            raise KnobError(f"OnnxInference: {kind} must map each tensor to its own column name, got {given!r}")
        return {n: given[n] for n in names if n in given}

    def one_process(self) -> bool:
        return self.refresh is not None  # every thread of the step follows one version

    def result_params(self):
        out = {**super().result_params(), "model": self.card.identity()}
        # Off, the fingerprint is that of a graph made before the knob existed; on, the step is its
        # model's name whatever the interval (a resume with another one skips what was done).
        if out.pop("model_refresh") is not None:
            out["model"] = followed(self.card)
        return out

    def __getstate__(self):  # a session is made again where it is used
        return {**super().__getstate__(), "_session": None, "_refresh": None}

    def setup(self):
        p = self.params
        asked = tuple(p["providers"] or self._placed() or ("CPUExecutionProvider",))
        providers = _available(asked)
        key = (self.card.ref, self.card.file, self.card.sha256, p["intra_op_threads"],
               p["inter_op_threads"], p["optimization"], p["spin"], providers)
        self.ctx.note(self.id, "providers_asked", list(asked))
        self.ctx.note(self.id, "providers", list(providers))
        self._session = self.ctx.shared(key, lambda: _session(self.card, *key[3:7], providers))
        if self.refresh is not None:
            def make(card):
                return _session(card, *key[3:7], providers)
            self._refresh = refresh_of(self.ctx, self.id, lambda: ModelRefresh(
                self.id, self.card, self._session, make, self.refresh, self.ctx))

    def _placed(self) -> tuple[str, ...]:
        """A step placed on a GPU (``placed(device="gpu")``) asks onnxruntime for CUDA first (an
        onnxruntime without it runs on the CPU)."""
        return ("CUDAExecutionProvider", "CPUExecutionProvider") if self.placement.get("device") == "gpu" else ()

    def run(self, x: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(list(self.fetches), x)

    def process(self, batch: pa.RecordBatch) -> Result:
        self.bind()
        card = self.card
        if self._refresh is not None:  # the version that answers this whole batch (an operator is one thread's)
            card, self._session = self._refresh.current()
        x = {t: batch.column(c).to_numpy_ndarray() for t, c in self.feeds.items()}
        n, b = batch.num_rows, self.batch_size
        try:
            parts = [self.run({t: v[i:i + b] for t, v in x.items()}) for i in range(0, n, b)]
            ys = [np.concatenate([part[j] for part in parts]) if parts else self._empty(j)
                  for j in range(len(self.fetches))]
            return Result(self._with_outputs(batch, ys, card), NO_DEAD_LETTERS)
        except Exception:
            return self._row_by_row(batch, x, card)

    def _empty(self, j):
        spec = self._out_specs[j]
        return np.empty((0, *spec.shape), spec.dtype)

    def _row_by_row(self, batch, x, card):
        keep, outs, bad, errors = [], [], [], []
        for i in range(batch.num_rows):
            try:
                outs.append([y[0] for y in self.run({t: v[i:i + 1] for t, v in x.items()})])
                keep.append(i)
            except Exception as exc:
                bad.append(i)
                errors.append(error_text(exc))
        ys = [np.stack([o[j] for o in outs]) if outs else self._empty(j) for j in range(len(self.fetches))]
        kept = batch.take(pa.array(keep, pa.int64()))
        return Result(self._with_outputs(kept, ys, card), dead_letters(batch, bad, self.id, errors))

    def _with_outputs(self, batch: pa.RecordBatch, ys: list[np.ndarray], card: ModelCard) -> pa.RecordBatch:
        schema = self.output_schemas([batch.schema])["out"]
        produced = {c: tensor_array(np.asarray(y, dtype=spec.dtype))
                    for c, y, spec in zip(self.fetches.values(), ys, self._out_specs)}
        if self.refresh is not None:
            produced[ANSWERED_BY] = pa.array([card.ref] * batch.num_rows, pa.string())
        return with_columns(batch, schema, produced)

"""ONNX Runtime inference as an operator."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core import NO_DEAD_LETTERS, Knob, Operator, Result, dead_letters, error_text, register, with_columns
from beamzoo.resources import shared
from beamzoo.schemas import tensor_array
from beamzoo.zoo import ModelCard

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32",
              "tensor(int64)": "int64"}

_OPT_LEVELS = ("disable", "basic", "extended", "all")


class ModelSignatureError(TypeError):
    """The ONNX model's real inputs or outputs differ from its card."""


def check_signature(session, card: ModelCard) -> None:
    """Compare the model's real input/output (name, dtype, shape) with the card."""
    problems = []
    for kind, nodes, name, spec in (("input", session.get_inputs(), card.input_name, card.input),
                                    ("output", session.get_outputs(), card.output_name, card.output)):
        by_name = {n.name: n for n in nodes}
        if name not in by_name:
            problems.append(f"{kind} '{name}' not in the model (it has {sorted(by_name)})")
            continue
        node = by_name[name]
        dtype = _ORT_TYPES.get(node.type, node.type)
        if dtype != spec.dtype:
            problems.append(f"{kind} '{name}' is {dtype}, the card says {spec.dtype}")
        dims = list(node.shape)[1:]
        if len(dims) != len(spec.shape) or any(
                isinstance(d, int) and s is not None and d != s for d, s in zip(dims, spec.shape)):
            problems.append(f"{kind} '{name}' has shape {list(node.shape)}, the card says "
                            f"[batch, {', '.join(map(str, spec.shape))}]")
    if problems:
        raise ModelSignatureError(f"model {card.ref} does not match its card: " + "; ".join(problems))


def _session(card: ModelCard, threads: int, inter: int, optimization: str, spin: bool,
             providers: tuple[str, ...]):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = inter
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel,
        {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
         "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}[optimization])
    session = ort.InferenceSession(str(card.onnx_path()), opts, providers=list(providers))
    check_signature(session, card)
    return session


@register("onnx_infer")
class OnnxInference(Operator):
    """pixels -> logits with onnxruntime, ``batch_size`` rows per run.

    Knobs: ``intra_op_threads`` and ``inter_op_threads`` (0 = onnxruntime's
    default: all cores), ``optimization`` ("disable", "basic", "extended",
    "all"), ``spin`` (let idle onnxruntime threads spin; off, since decoding
    wants those cores), ``providers`` (e.g. ["CUDAExecutionProvider",
    "CPUExecutionProvider"]). With one intra-op thread the step may run in
    several threads at once, one session per process shared by all.
    ``keep_input`` keeps the input tensor (a cascade feeds it to a second model).
    A batch that fails is retried row by row so only the bad rows dead-letter.
    """

    default_id = "infer"
    knobs = {
        "model": Knob(None, object, doc="a zoo name[:version] or a whole card"),
        "input_field": Knob("pixels", str), "output_field": Knob("logits", str),
        "keep_input": Knob(False, bool),
        "batch_size": Knob(4, int, low=1, high=65536, results=False, doc="rows per inference call"),
        "intra_op_threads": Knob(1, int, low=0, high=1024, results=False),
        "inter_op_threads": Knob(0, int, low=0, high=1024, results=False),
        "optimization": Knob("all", str, choices=_OPT_LEVELS, results=False),
        "spin": Knob(False, bool, results=False),
        "providers": Knob(None, list, results=False),
    }

    def __init__(self, model: ModelCard | str | dict, input_field: str = "pixels",
                 output_field: str = "logits", batch_size: int = 4, intra_op_threads: int = 1,
                 inter_op_threads: int = 0, optimization: str = "all", spin: bool = False,
                 providers: list[str] | None = None, keep_input: bool = False, id: str | None = None):
        card = ModelCard.from_param(model)
        self.card = card
        super().__init__(id, model=card.to_param(), input_field=input_field, output_field=output_field,
                         batch_size=batch_size, intra_op_threads=intra_op_threads,
                         inter_op_threads=inter_op_threads, optimization=optimization, spin=spin,
                         providers=providers, keep_input=keep_input)

    def configure(self):
        p = self.params
        self.card = ModelCard.from_param(p["model"])
        self.input_field, self.output_field = p["input_field"], p["output_field"]
        self.batch_size = p["batch_size"]
        self.parallel = p["intra_op_threads"] == 1
        self.requires = pa.schema([self.card.input.field(self.input_field)])
        self.produces = pa.schema([self.card.output.field(self.output_field)])
        self.consumes = () if p["keep_input"] else (self.input_field,)
        self._session = None

    def result_params(self):
        return {**super().result_params(), "model": self.card.identity()}

    def __getstate__(self):
        return {**self.__dict__, "_session": None}  # a session is made again where it is used

    def setup(self):
        if self._session is None:
            p = self.params
            key = (self.card.ref, self.card.path, p["intra_op_threads"], p["inter_op_threads"],
                   p["optimization"], p["spin"], tuple(p["providers"] or ()))
            self._session = shared(key, lambda: _session(self.card, *key[2:6],
                                                         key[6] or ("CPUExecutionProvider",)))

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run([self.card.output_name], {self.card.input_name: x})[0]

    def process(self, batch: pa.RecordBatch) -> Result:
        self.setup()
        x = batch.column(self.input_field).to_numpy_ndarray()
        try:
            y = np.concatenate([self.run(x[i:i + self.batch_size])
                                for i in range(0, len(x), self.batch_size)] or
                               [np.empty((0, *self.card.output.shape), np.float32)])
            return Result(self._with_output(batch, y), NO_DEAD_LETTERS)
        except Exception:
            return self._row_by_row(batch, x)

    def _row_by_row(self, batch, x):
        keep, outs, bad, errors = [], [], [], []
        for i in range(len(x)):
            try:
                outs.append(self.run(x[i:i + 1])[0])
                keep.append(i)
            except Exception as exc:
                bad.append(i)
                errors.append(error_text(exc))
        y = np.stack(outs) if outs else np.empty((0, *self.card.output.shape), np.float32)
        kept = batch.take(pa.array(keep, pa.int64()))
        return Result(self._with_output(kept, y), dead_letters(batch, bad, self.id, errors))

    def _with_output(self, batch: pa.RecordBatch, y: np.ndarray) -> pa.RecordBatch:
        schema = self.output_schemas([batch.schema])["out"]
        out = tensor_array(np.asarray(y, dtype=self.card.output.dtype))
        return with_columns(batch, schema, {self.output_field: out})

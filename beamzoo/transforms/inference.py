"""ONNX Runtime inference as an operator."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from beamzoo.core import NO_DEAD_LETTERS, Hints, Operator, Result, dead_letters, error_text
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


class OnnxInference(Operator):
    """pixels -> logits with onnxruntime, ``batch_size`` rows per run.

    Knobs: ``intra_op_threads`` and ``inter_op_threads`` (0 = onnxruntime's
    default: all cores), ``optimization`` ("disable", "basic", "extended",
    "all"), ``spin`` (let idle onnxruntime threads spin; off, since decoding
    wants those cores), ``providers`` (e.g. ["CUDAExecutionProvider",
    "CPUExecutionProvider"]). With one intra-op thread the step may run in
    several threads at once (``hints.parallel``), one session shared.
    A batch that fails is retried row by row so only the bad rows dead-letter.
    """

    def __init__(self, card: ModelCard, input_field: str = "pixels", output_field: str = "logits",
                 batch_size: int = 4, intra_op_threads: int = 1, inter_op_threads: int = 0,
                 optimization: str = "all", spin: bool = False, providers: list[str] | None = None,
                 name: str = "infer"):
        super().__init__(name, Hints(batch_size=batch_size, parallel=intra_op_threads == 1))
        if optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization must be one of {_OPT_LEVELS}, got {optimization!r}")
        self.card, self.input_field, self.output_field = card, input_field, output_field
        self.batch_size = batch_size
        self.intra_op_threads, self.inter_op_threads = intra_op_threads, inter_op_threads
        self.optimization, self.spin, self.providers = optimization, spin, providers
        self.requires = pa.schema([card.input.field(input_field)])
        self.produces = pa.schema([card.output.field(output_field)])
        self.consumes = (input_field,)
        self._session = None

    def __getstate__(self):
        return {**self.__dict__, "_session": None}

    def setup(self):
        if self._session is not None:
            return
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel,
            {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
             "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}[self.optimization])
        path = str(self.card.onnx_path())
        session = ort.InferenceSession(path, opts, providers=self.providers or ["CPUExecutionProvider"])
        check_signature(session, self.card)
        self._session = session

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
        return Result(self._with_output(kept, y), dead_letters(batch, bad, self.name, errors))

    def _with_output(self, batch: pa.RecordBatch, y: np.ndarray) -> pa.RecordBatch:
        schema = self.output_schema(batch.schema)
        cols = {f.name: batch.column(f.name) for f in batch.schema if f.name in schema.names}
        cols[self.output_field] = tensor_array(np.asarray(y, dtype=self.card.output.dtype))
        return pa.record_batch([cols[n] for n in schema.names], schema=schema)

    def fingerprint(self):
        return {**super().fingerprint(), "model": self.card.ref, "sha256": self.card.model_sha256()}

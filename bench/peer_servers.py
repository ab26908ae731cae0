"""The serving peers bench/serve_peers.py measures, run in their own venv: MLServer and PyTriton.

Each serves the zoo's EfficientNet-Lite0 ONNX file as ``beamzoo serve`` does:
KServe v2, one ``BYTES`` input ``image`` of base64 JPEGs; per image the
same pixel work as beamzoo (bench/pixels.py: reduced-scale decode, resize
256, centre crop 224, [-1, 1], NCHW), then onnxruntime on the batch (one
intra-op thread per worker, idle threads not spinning), softmax and top 5;
outputs ``label``, ``score``, ``topk_labels``, ``topk_scores``.

    python bench/peer_servers.py triton MODEL LABELS HTTP GRPC METRICS --max_batch 8 --max_delay_ms 5 --workers 2

MLServer loads ``peer_servers.OnnxClassifier`` from the settings serve_peers.py writes.
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import sysconfig

import cv2
import numpy as np
import onnxruntime as ort
import pixels

TOPK = 5


class Classifier:
    """base64 JPEGs -> (label, score, top-5 labels, top-5 scores) per image, one session."""

    def __init__(self, model: str, labels: str):
        cv2.setNumThreads(1)  # one worker per core is the parallelism
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.labels = np.array(pixels.load_labels(labels), dtype=object)

    def __call__(self, encoded) -> tuple[np.ndarray, ...]:
        x = np.stack([pixels.preprocess(pixels.decode(base64.b64decode(e))) for e in encoded])
        logits = self.session.run(None, {self.input: x})[0].astype(np.float32)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        top = np.argsort(-p, axis=1)[:, :TOPK]
        scores = np.take_along_axis(p, top, axis=1)
        return self.labels[top[:, 0]], scores[:, 0], self.labels[top], scores


if __name__ != "__main__":  # MLServer imports this file; run as a script (the Triton child) it must not
    # load MLServer's gRPC protos: they clash with tritonclient's ("duplicate symbol inference.*")
    from mlserver import MLModel
    from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

    class OnnxClassifier(MLModel):
        """An MLServer custom runtime; its model settings' ``parameters.extra`` give ``model`` and ``labels``."""

        async def load(self) -> bool:
            extra = self.settings.parameters.extra
            self.classify = Classifier(extra["model"], extra["labels"])
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            label, score, topk_labels, topk_scores = self.classify(payload.inputs[0].data.root)
            n = len(label)
            return InferenceResponse(model_name=self.name, model_version=self.version, outputs=[
                ResponseOutput(name="label", datatype="BYTES", shape=[n, 1], data=label.tolist()),
                ResponseOutput(name="score", datatype="FP32", shape=[n, 1], data=score.tolist()),
                ResponseOutput(name="topk_labels", datatype="BYTES", shape=[n, TOPK],
                               data=topk_labels.ravel().tolist()),
                ResponseOutput(name="topk_scores", datatype="FP32", shape=[n, TOPK],
                               data=topk_scores.ravel().tolist())])


def utf8(labels: np.ndarray) -> np.ndarray:
    return np.char.encode(labels.astype(np.str_), "utf-8")


def triton(args) -> None:
    """PyTriton: one bound callable per worker (Triton's model instances), its dynamic batcher."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    def instance():
        classify = Classifier(args.model, args.labels)

        @batch
        def infer(image):
            label, score, topk_labels, topk_scores = classify(image[:, 0])
            return {"label": utf8(label)[:, None], "score": score[:, None],
                    "topk_labels": utf8(topk_labels), "topk_scores": topk_scores}
        return infer

    # Triton's Python stub links libpython3.X.so: this interpreter's, not another 3.X the system has
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http, grpc_address="127.0.0.1",
                          grpc_port=args.grpc, metrics_address="127.0.0.1", metrics_port=args.metrics,
                          exit_on_error=True)
    with Triton(config=config) as t:
        t.bind(model_name="efficientnet_lite0", infer_func=[instance() for _ in range(args.workers)],
               inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
               outputs=[Tensor(name="label", dtype=np.bytes_, shape=(1,)),
                        Tensor(name="score", dtype=np.float32, shape=(1,)),
                        Tensor(name="topk_labels", dtype=np.bytes_, shape=(TOPK,)),
                        Tensor(name="topk_scores", dtype=np.float32, shape=(TOPK,))],
               config=ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher(
                   max_queue_delay_microseconds=int(args.max_delay_ms * 1000))))
        print(f"listening on http://127.0.0.1:{args.http}", file=sys.stderr, flush=True)
        t.serve()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", choices=["triton"])
    p.add_argument("model")
    p.add_argument("labels")
    p.add_argument("http", type=int)
    p.add_argument("grpc", type=int)
    p.add_argument("metrics", type=int)
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--max_delay_ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1)
    triton(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

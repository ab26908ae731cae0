"""The three PP-OCR models as onnxruntime sessions, one per process and setting,
made from the verified bytes of their zoo cards (``beamzoo/zoo/models/ppocr*``)."""
from __future__ import annotations

from beamzoo.resources import shared

DETECTOR, RECOGNIZER, ANGLE = "ppocrv4_det:1", "ppocrv4_rec:1", "ppocr_cls:1"


def card(ref: str, task: str):
    """The zoo card ``ref``, refused unless it is a model for ``task``."""
    from beamzoo import zoo
    found = zoo.get(ref)
    if found.task != task:
        raise ValueError(f"model {found.ref} is for {found.task}, not {task}")
    return found


def model_bytes(ref: str) -> bytes:
    """The verified ONNX bytes of a model card (built from the RapidOCR wheel on first use)."""
    from beamzoo import zoo
    return zoo.get(ref).model_bytes()


def session(ref: str, threads: int = 1):
    """A shared onnxruntime session for ``ref`` with ``threads`` intra-op threads (0: all cores)."""
    def make():
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # ~10 % faster, same lines
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(model_bytes(ref), opts, providers=["CPUExecutionProvider"])
    return shared(("ocr", ref, threads), make)


def characters(sess) -> list[str]:
    """The recognizer's classes: the CTC blank, its dictionary (in the model's metadata), a space."""
    meta = sess.get_modelmeta().custom_metadata_map
    if "character" not in meta:
        raise ValueError("the recognition model has no 'character' dictionary in its metadata")
    return ["", *meta["character"].splitlines(), " "]


class UsesModel:
    """For a step with one OCR model (knobs ``model`` and ``intra_op_threads``): its card,
    checked for ``task``, enters the fingerprint; its session is shared per process."""

    task = ""

    def use_model(self) -> None:
        """Call from ``configure``."""
        self.card = card(self.params["model"], self.task)
        self.parallel = self.params["intra_op_threads"] == 1
        self._session = None

    def result_params(self):
        return {**super().result_params(), "model": self.card.identity()}

    def setup(self):
        if self._session is None:
            self._session = session(self.params["model"], self.params["intra_op_threads"])

    def __getstate__(self):
        return {**self.__dict__, "_session": None}

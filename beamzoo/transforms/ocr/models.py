"""The three PP-OCR models as onnxruntime sessions, one per process and setting,
made from the verified bytes of their zoo cards (``beamzoo/zoo/models/ppocr*``)."""
from __future__ import annotations

from beamzoo.core.op import Operator
from beamzoo.transforms.model import MODEL
from beamzoo.zoo import ModelCard, card_of, model_bytes

DETECTOR, RECOGNIZER, ANGLE = "ppocrv4_det:1", "ppocrv4_rec:1", "ppocr_cls:1"


def model_knob(default: str, what: str):
    """An OCR step's ``model`` knob: a built-in model by default."""
    return MODEL.but(default=default, required=False, doc=f"the {what} model (a zoo name, a card file or a card)")


def card(param, task: str) -> ModelCard:
    """The card ``param`` names, refused unless it is a model for ``task``."""
    found = card_of(param)
    if found.task != task:
        raise ValueError(f"model {found.ref} is for {found.task}, not {task}")
    return found


def session(op: Operator, found: ModelCard, threads: int = 1):
    """A shared onnxruntime session for ``found`` with ``threads`` intra-op threads (0: all cores)."""
    def make():
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # ~10 % faster, same lines
        opts.log_severity_level = 4  # a failed run raises, and becomes a dead letter with the reason
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(model_bytes(found), opts, providers=["CPUExecutionProvider"])
    return op.ctx.shared(("ocr", found.ref, found.sha256, threads), make)


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
        self._session = session(self, self.card, self.params["intra_op_threads"])

    def __getstate__(self):
        return {**super().__getstate__(), "_session": None}

"""beamzoo's operators, and the one list of the built-in ones.

Every built-in op is named in ``BUILTIN`` and registered here, in one place
(``beamzoo.core.registry``), so a graph read from JSON finds its steps; a
user's own op is registered with ``beamzoo.register``.
"""
from beamzoo.core.registry import register
from beamzoo.transforms.deadline import Deadline, DeadlineCheck
from beamzoo.transforms.escalate import Escalate
from beamzoo.transforms.flow import Collect, Drop, Merge, Rename, Route, Tiles
from beamzoo.transforms.gate import Gate
from beamzoo.transforms.inference import OnnxInference
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.ocr import CropText, DetectText, RecognizeText, TextAngle, TextLines
from beamzoo.transforms.postprocess import TopK
from beamzoo.transforms.preprocess import DecodeImage, DecodeResize, ResizeCrop
from beamzoo.transforms.remote import RemoteClassify
from beamzoo.transforms.resume import Key, SkipDone, StatKey
from beamzoo.transforms.serving import Requests, Responses
from beamzoo.transforms.sinks import WriteJsonl, WriteParquet
from beamzoo.transforms.sources import Files, Input, Manifest, Rows

BUILTIN = (
    # sources
    Files, Manifest, Rows, Input, Requests,
    # reading, decoding, inference, answers
    ReadFiles, DecodeImage, ResizeCrop, DecodeResize, OnnxInference, TopK,
    # flow
    Route, Merge, Drop, Rename, Tiles, Collect,
    # OCR
    DetectText, CropText, TextAngle, RecognizeText, TextLines,
    # policies, gates, cascades, remote tiers, resume
    Deadline, DeadlineCheck, Gate, Escalate, RemoteClassify, Key, StatKey, SkipDone,
    # sinks
    WriteParquet, WriteJsonl, Responses,
)

for _op in BUILTIN:
    register(_op)

__all__ = ["BUILTIN", *(op.__name__ for op in BUILTIN)]

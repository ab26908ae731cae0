"""OCR as graph steps: detect text regions (one image -> many regions), crop and
rectify each, turn upside-down ones, recognize them in batches across images,
and collect the lines back per image (``beamzoo.transforms.ocr.pipeline``).
The models are PP-OCRv4 detection and recognition and the PP-OCR angle
classifier, from the ``rapidocr-onnxruntime`` wheel (``beamzoo.zoo.rapidocr``)."""
from beamzoo.transforms.ocr.angle import TextAngle
from beamzoo.transforms.ocr.crop import CropText
from beamzoo.transforms.ocr.detect import DetectText
from beamzoo.transforms.ocr.lines import TextLines
from beamzoo.transforms.ocr.recognize import RecognizeText

__all__ = ["CropText", "DetectText", "RecognizeText", "TextAngle", "TextLines"]

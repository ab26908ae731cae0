"""jpeg_end: where a JPEG ends, on real JPEGs from OpenCV and Pillow."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from badfiles import photo
from beamzoo.imaging.jpeg import jpeg_end

RST_MARKERS = [bytes([0xFF, m]) for m in range(0xD0, 0xD8)]


def cv2_jpeg(img=None, params=()) -> bytes:
    ok, buf = cv2.imencode(".jpg", photo() if img is None else img, list(params))
    assert ok
    return buf.tobytes()


def pil_jpeg(**save_args) -> bytes:
    im = Image.fromarray(cv2.cvtColor(photo(), cv2.COLOR_BGR2RGB))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save_args)
    return buf.getvalue()


def decodes(data: bytes) -> bool:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return img is not None and img.shape[:2] == photo().shape[:2]


def with_segment(jpg: bytes, marker: int, payload: bytes) -> bytes:
    """``jpg`` with a marker segment inserted right after its SOI."""
    return jpg[:2] + struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload + jpg[2:]


@pytest.fixture(scope="module")
def baseline() -> bytes:
    return cv2_jpeg()


@pytest.fixture(scope="module")
def progressive() -> bytes:
    data = pil_jpeg(progressive=True, optimize=True)
    assert b"\xff\xc2" in data  # SOF2
    assert data.count(b"\xff\xda") > 3  # many scans ...
    first_scan = data.index(b"\xff\xda")
    assert b"\xff\xc4" in data[first_scan:]  # ... with DHT segments between them
    return data


@pytest.fixture(scope="module", params=["baseline", "progressive"])
def jpg(request) -> bytes:
    return request.getfixturevalue(request.param)


def test_whole_jpeg_ends_at_its_length(jpg):
    assert jpeg_end(jpg) == len(jpg)


def fake_mp4(jpg: bytes, size: int) -> bytes:
    """An MP4-like blob full of SOI ... EOI sequences and whole JPEGs."""
    rng = np.random.default_rng(1)
    parts = [struct.pack(">I", 24) + b"ftypmp42" + b"\0" * 12]
    while sum(map(len, parts)) < size:
        parts += [rng.bytes(int(rng.integers(10, 5000))), b"\xff\xd8\xff\xe0\x00\x10",
                  rng.bytes(100), b"\xff\xd9", jpg[: len(jpg) // 3], b"\xff\xd9\xff\xd9", jpg]
    return b"".join(parts)[:size]


@pytest.mark.parametrize("kind", ["random", "mp4", "zeros", "ff"])
def test_bytes_after_eoi_do_not_matter(jpg, kind):
    size = 5 * 1024 * 1024
    extra = {"random": lambda: np.random.default_rng(0).bytes(size),
             "mp4": lambda: fake_mp4(jpg, size),
             "zeros": lambda: b"\0" * size,
             "ff": lambda: b"\xff" * size}[kind]()
    assert len(extra) == size
    if kind == "mp4":
        assert extra.count(b"\xff\xd8") > 100 and extra.count(b"\xff\xd9") > 100
    assert jpeg_end(jpg + extra) == len(jpg)


def test_concatenated_jpegs_end_after_the_first(baseline, progressive):
    assert jpeg_end(baseline + progressive) == len(baseline)
    assert jpeg_end(progressive + baseline) == len(progressive)


def test_restart_intervals():
    if not hasattr(cv2, "IMWRITE_JPEG_RST_INTERVAL"):
        pytest.skip("this OpenCV cannot write restart markers (no IMWRITE_JPEG_RST_INTERVAL)")
    data = cv2_jpeg(params=[cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    assert b"\xff\xdd" in data  # DRI
    scan = data[data.index(b"\xff\xda"):]
    assert sum(scan.count(m) for m in RST_MARKERS) > 50
    assert jpeg_end(data) == len(data)
    assert jpeg_end(data + cv2_jpeg()) == len(data)
    assert all(jpeg_end(data[:cut]) is None for cut in range(2, len(data), 97))


def test_truncations_return_none(jpg):
    cuts = list(range(2, len(jpg), 211)) + [len(jpg) - k for k in (1, 2, 10)]
    ends = {cut: jpeg_end(jpg[:cut]) for cut in cuts}
    assert ends == {cut: None for cut in cuts}


def test_truncated_then_padded_with_zeros_is_truncated(baseline):
    cut = baseline[: len(baseline) // 2]
    assert jpeg_end(cut + b"\0" * 4096) is None


def test_eoi_bytes_inside_app_segment_are_skipped(baseline):
    data = with_segment(baseline, 0xEF, b"junk\xff\xd9\xff\xd8\xff\xd9end")  # APP15
    assert decodes(data)
    assert jpeg_end(data) == len(data)
    assert jpeg_end(data + b"\xff\xd9") == len(data)


def test_pillow_app1_with_eoi_bytes_and_embedded_thumbnail(progressive):
    thumb = cv2_jpeg(cv2.resize(photo(), (160, 106)))
    exif = b"Exif\0\0junk\xff\xd9" + thumb + b"\xff\xd9tail"
    data = pil_jpeg(progressive=True, exif=exif)
    assert data.index(thumb) < data.index(b"\xff\xda")  # inside APP1, before the image
    assert decodes(data)
    assert jpeg_end(data) == len(data)
    assert jpeg_end(data[: data.index(thumb) + len(thumb)]) is None


def test_comment_fill_bytes_and_tem(baseline):
    data = with_segment(baseline, 0xFE, b"a comment \xff\xd9")  # COM
    data = data[:2] + b"\xff\x01" + data[2:]  # TEM, no length
    dqt = data.index(b"\xff\xdb")
    data = data[:dqt] + b"\xff" * 7 + data[dqt:]  # fill bytes before DQT
    data = data[:-2] + b"\xff" * 5 + data[-2:]  # ... and before EOI
    assert decodes(data)
    assert jpeg_end(data) == len(data)
    assert jpeg_end(data[:-1]) is None


def test_segment_length_past_the_end_is_truncated(baseline):
    data = baseline[:2] + b"\xff\xe1\xff\xf0" + b"x" * 100 + baseline[2:]
    assert len(data) < 0xFFF0 + 4
    assert jpeg_end(data) is None
    assert jpeg_end(b"\xff\xd8\xff\xe0\x00") is None  # the length itself is cut


@pytest.mark.parametrize("data", [
    b"", b"\xff", b"hello, world", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"\xd8\xff\xd9",
    b"\xff\xd8hello", b"\xff\xd8\xff\xd8\xff\xd9", b"\xff\xd8\xff\xe0\x00\x01\xff\xd9",
    b"\xff\xd8\xff\xe0\x00\x00\xff\xd9", b"\xff\xd8\xff\x00\xff\xd9",
])
def test_not_a_jpeg_raises(data):
    with pytest.raises(ValueError, match="not a JPEG"):
        jpeg_end(data)


def test_garbage_between_segments_raises(baseline, progressive):
    dqt = baseline.index(b"\xff\xdb")
    with pytest.raises(ValueError, match="no marker"):
        jpeg_end(baseline[:dqt] + b"junk" + baseline[dqt:])
    # after the first scan, a DHT segment followed by junk (not entropy-coded data)
    dht = progressive.index(b"\xff\xc4", progressive.index(b"\xff\xda"))
    after = dht + 2 + int.from_bytes(progressive[dht + 2:dht + 4], "big")
    assert progressive[after] == 0xFF
    with pytest.raises(ValueError, match="no marker"):
        jpeg_end(progressive[:after] + b"junk" + progressive[after:])


def test_png_of_the_photo_raises():
    ok, png = cv2.imencode(".png", photo())
    with pytest.raises(ValueError):
        jpeg_end(png.tobytes())

"""PNM, HEIF (HEIC) and AVIF: made at test time from the sample photographs, scored as
the JPEG they came from, and refused from their headers when they are too big or malformed."""
from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys

import cv2
import numpy as np
import pillow_heif
import pyarrow as pa
import pytest
from PIL import Image

from badfiles import photo
from beamzoo.imaging import decode, magic_format, read_header
from beamzoo.samples import sample_files
from beamzoo.transforms.io import list_files
from beamzoo.transforms.preprocess import DecodeImage
from conftest import ROOT, read


def heic(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    pillow_heif.from_pillow(im).save(buf, format="HEIF", **kw)
    return buf.getvalue()


def avif(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "AVIF", **kw)
    return buf.getvalue()


def rgb_photo() -> Image.Image:
    return Image.fromarray(cv2.cvtColor(photo(), cv2.COLOR_BGR2RGB))


def with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a HEIF or AVIF file) whose ispe box, and clean aperture if it has one, say width x height."""
    out = bytearray(data)
    at = out.index(b"ispe")
    out[at + 8:at + 16] = struct.pack(">II", width, height)
    if b"clap" in out:
        at = out.index(b"clap")
        out[at + 4:at + 36] = struct.pack(">8I", width, 1, height, 1, 0, 1, 0, 1)
    return bytes(out)


def pnm_bomb(width: int, height: int) -> bytes:
    return b"P6\n%d %d\n255\n" % (width, height) + bytes(100)


# ---------------------------------------------------------------- end to end, through the CLI

# Photos whose copy gets another top label than the JPEG (measured; the JPEG's own top two are
# close: 0.39 / 0.37 and 0.19 / 0.13): there the label must be among the JPEG's top 3.
OTHER_TOP_LABEL = {"pnm": {"astronaut"}, "heic": {"chelsea", "astronaut"}, "avif": set()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Each sample photograph (short side 320) as JPEG, PNM, HEIC and AVIF, and hostile files beside
    them, scored by the CLI: (predictions by file name, dead letters by file name)."""
    d = tmp_path_factory.mktemp("formats")
    for src in sample_files():
        rgb = decode(src.read_bytes(), 10**8)
        scale = 320 / min(rgb.shape[:2])
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        im = Image.fromarray(rgb)
        im.save(d / f"{src.stem}.jpg", quality=95)
        im.save(d / f"{src.stem}.png")  # the same pixels as the PNM
        if Image.open(src).mode == "L":
            im.convert("L").save(d / f"{src.stem}.pgm")
        else:
            im.save(d / f"{src.stem}.ppm")
        (d / f"{src.stem}.heic").write_bytes(heic(im, quality=90))
        (d / f"{src.stem}.avif").write_bytes(avif(im, quality=90))
    small = Image.new("RGB", (64, 48), (200, 30, 30))
    (d / "phone.jpg").write_bytes((d / "chelsea.heic").read_bytes())  # told by its content, not its name
    (d / "bomb.ppm").write_bytes(pnm_bomb(30000, 30000))
    (d / "short.ppm").write_bytes(b"P6\n200 200\n255\n" + bytes(1000))
    (d / "badheader.pgm").write_bytes(b"P5\n12x7\n255\n" + bytes(84))
    (d / "bomb.heic").write_bytes(with_size(heic(small), 30000, 30000))
    (d / "bomb.avif").write_bytes(with_size(avif(small), 12000, 12000))
    cut = (d / "flower.heic").read_bytes()
    (d / "truncated.heic").write_bytes(cut[: len(cut) // 2])
    out = tmp_path_factory.mktemp("out")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--no_progress",
                          "--input", str(d / "*"), "--output", str(out), "--runner=EdgeRunner"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "inputs: 67  scored: 61  dead letters: 6" in run.stdout
    rows = {os.path.basename(r["path"]): r for r in read(out)}
    dead = {os.path.basename(r["source"]): r for r in read(out, "dead_letter")}
    return rows, dead


@pytest.mark.integration
def test_each_format_scores_as_the_jpeg_it_came_from(scored):
    rows, _ = scored
    for src in sample_files():
        jpeg = rows[f"{src.stem}.jpg"]
        pnm, png = rows.get(f"{src.stem}.pgm") or rows[f"{src.stem}.ppm"], rows[f"{src.stem}.png"]
        assert (pnm["label"], pnm["topk_scores"]) == (png["label"], png["topk_scores"]), src.stem  # lossless
        if src.stem in OTHER_TOP_LABEL["pnm"]:
            assert pnm["label"] in jpeg["topk_labels"][:3], src.stem
        else:
            assert pnm["label"] == jpeg["label"], src.stem
        for ext in ("heic", "avif"):
            got = rows[f"{src.stem}.{ext}"]["label"]
            if src.stem in OTHER_TOP_LABEL[ext]:
                assert got in jpeg["topk_labels"][:3], (src.stem, ext)
            else:
                assert got == jpeg["label"], (src.stem, ext)
    assert rows["phone.jpg"]["label"] == rows["chelsea.heic"]["label"]
    assert rows["phone.jpg"]["score"] == rows["chelsea.heic"]["score"]


@pytest.mark.integration
def test_too_big_or_malformed_files_are_dead_letters_with_a_reason(scored):
    _, dead = scored
    reasons = {name: r["error"] for name, r in dead.items()}
    assert {r["stage"] for r in dead.values()} == {"classify/decode"}
    limit = "pixels, over the limit of 100000000 (raise max_pixels to accept it)"
    assert reasons["bomb.ppm"] == f"ValueError: image is 30000x30000 = 900000000 {limit}"
    assert reasons["bomb.heic"] == f"ValueError: image is 30000x30000 = 900000000 {limit}"
    assert reasons["bomb.avif"] == f"ValueError: image is 12000x12000 = 144000000 {limit}"
    assert reasons["short.ppm"] == ("ValueError: PNM data is shorter than its header promises: a 200x200 P6 needs "
                                    "120000 bytes of pixels, 1000 follow (truncated?)")
    assert reasons["badheader.pgm"] == ("ValueError: PNM header is corrupt: expected the height at offset 5, "
                                        "found b'x7\\n255\\n\\x00'")
    assert reasons["truncated.heic"].startswith("ValueError: could not decode this HEIF image (ValueError: Invalid "
                                                "input: Unexpected end of file")
    assert len(reasons) == 6


# ---------------------------------------------------------------- PNM

def test_every_pnm_kind_decodes_to_the_pixels_it_holds():
    bgr = photo()
    rgb = bgr[..., ::-1]
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    ascii_ = [cv2.IMWRITE_PXM_BINARY, 0]
    for data in (cv2.imencode(".ppm", bgr)[1], cv2.imencode(".ppm", bgr, ascii_)[1]):  # P6, P3
        assert np.array_equal(decode(data.tobytes(), 10**8), rgb)
    for data in (cv2.imencode(".pgm", gray)[1], cv2.imencode(".pgm", gray, ascii_)[1]):  # P5, P2
        assert np.array_equal(decode(data.tobytes(), 10**8), np.dstack([gray] * 3))
    ink = gray < 100  # 1 is black in a PBM
    p4 = b"P4\n%d %d\n" % ink.shape[::-1] + np.packbits(ink, axis=1).tobytes()
    p1 = b"P1\n# a bitmap\n%d %d\n" % ink.shape[::-1] + b"\n".join(b"".join(b"%d" % v for v in row) for row in ink)
    for data in (p4, p1):
        assert magic_format(data) == "PNM"
        assert np.array_equal(decode(data, 10**8), np.dstack([np.where(ink, 0, 255).astype(np.uint8)] * 3))


def test_samples_scale_from_maxval_to_0_255_and_sixteen_bits_become_eight():
    p5 = b"P5\n4 1\n1000\n" + np.array([0, 500, 1000, 1200], ">u2").tobytes()  # 1200: over maxval
    assert decode(p5, 10**8)[0, :, 0].tolist() == [0, 128, 255, 255]
    assert decode(b"P2 3 1 100\n0 50 100\n", 10**8)[0, :, 1].tolist() == [0, 128, 255]
    deep = cv2.imencode(".ppm", photo().astype(np.uint16) * 257)[1].tobytes()
    assert deep.startswith(b"P6\n451 300\n65535\n")
    assert np.array_equal(decode(deep, 10**8, channels="BGR"), photo())  # as a 16-bit PNG gives it


def test_pnm_header_comments_and_whitespace():
    from beamzoo.imaging.pnm import pnm_header
    pixels = bytes(range(6))
    for header in (b"P6\n2 1\n255\n", b"P6#by hand\n2\t1\r\n# size above\n255\n", b"P6 2 1 255#end\n",
                   b"P6\n\n  2\x0b1\x0c255 "):
        h = pnm_header(header + pixels)
        assert (h.kind, h.width, h.height, h.maxval, h.offset) == ("P6", 2, 1, 255, len(header)), header
        assert decode(header + pixels, 10**8).tolist() == [[[0, 1, 2], [3, 4, 5]]]
    assert pnm_header(b"P4\n9 2\n" + bytes(4)) == ("P4", 9, 2, 1, 7)


@pytest.mark.parametrize("data, reason", [
    (b"P6", "PNM header is truncated before its width"),
    (b"P6\n640", "PNM header is truncated before its height"),
    (b"P6\n640 480\n", "PNM header is truncated before its maxval"),
    (b"P6\n640 480\n255", "PNM header is truncated after its last field"),
    (b"P6\n-1 480\n255\n", "PNM header is corrupt: expected the width at offset 3, found b'-1 480\\n2'"),
    (b"P6\n640 480\n255x" + bytes(99), "PNM header is corrupt: no whitespace after its last field (offset 14)"),
    (b"P6\n640 480\n0\n", "PNM header is corrupt: maxval 0 is outside 1..65535"),
    (b"P5\n640 480\n65536\n", "PNM header is corrupt: maxval 65536 is outside 1..65535"),
    (b"P6\n99999999999 1\n255\n", "PNM header is corrupt: its width 99999999999 is absurd"),
    (b"P5\n0 10\n255\n", "image has no pixels (0x10)"),
    (b"P6\n#" + b"x" * (1 << 20), "PNM header is corrupt: no width within its first 1048576 bytes"),
    (b"P5\n100 100\n255\n" + bytes(9999), "a 100x100 P5 needs 10000 bytes of pixels, 9999 follow"),
    (b"P5\n100 100\n256\n" + bytes(10000), "a 100x100 P5 needs 20000 bytes of pixels, 10000 follow"),
    (b"P4\n9 2\n\x00\x00\x00", "a 9x2 P4 needs 4 bytes of pixels, 3 follow"),
    (b"P3\n2 2\n255\n1 2 3 4 5 6", "a 2x2 P3 needs at least 23 bytes of pixels, 11 follow"),
    (b"P2\n2 2\n255\n1 2 3 x", "could not decode this PNM (P2) image"),
])
def test_malformed_pnm_is_refused_with_a_reason(data, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        decode(data, 10**8)


def test_a_pnm_promising_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(ValueError, match="image is 30000x30000 = 900000000 pixels, over the limit of 100000000"):
        decode(pnm_bomb(30000, 30000), 10**8)
    # Allowed that many, it is still refused before OpenCV (which would reserve 2.7 GB for it).
    with pytest.raises(ValueError, match="PNM data is shorter than its header promises: a 30000x30000 P6"):
        decode(pnm_bomb(30000, 30000), 10**9)
    assert read_header(pnm_bomb(30000, 30000)) == ("PNM", 30000, 30000)


# ---------------------------------------------------------------- HEIF and AVIF

@pytest.mark.parametrize("encode, fmt", [(heic, "HEIF"), (avif, "AVIF")])
def test_heif_and_avif_decode_close_to_their_source(encode, fmt):
    rgb = np.asarray(rgb_photo())
    data = encode(rgb_photo(), quality=90)
    assert magic_format(data) == fmt and read_header(data) == (fmt, 451, 300)
    img = decode(data, 10**8)
    assert img.dtype == np.uint8 and img.shape == rgb.shape
    assert np.abs(img.astype(int) - rgb).mean() < 3
    assert np.array_equal(decode(data, 10**8, channels="BGR"), img[..., ::-1])
    for mode, colour in (("RGBA", (10, 200, 10, 100)), ("L", 77)):  # alpha dropped, grey to three channels
        got = decode(encode(Image.new(mode, (64, 48), colour)), 10**8)
        assert got.shape == (48, 64, 3)
        assert np.abs(got.astype(int) - (colour[:3] if mode == "RGBA" else (77,) * 3)).max() <= 3


def test_avif_rotation_is_applied():
    im = Image.new("RGB", (64, 48), (200, 30, 30))
    im.paste((30, 30, 200), (0, 0, 32, 48))  # blue on the left
    exif = im.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: blue on top
    img = decode(avif(im, exif=exif.tobytes()), 10**8)
    assert img.shape == (64, 48, 3)
    assert img[5, 24, 2] > 150 and img[58, 24, 0] > 150


@pytest.mark.parametrize("encode, fmt", [(heic, "HEIF"), (avif, "AVIF")])
def test_heif_and_avif_sizes_come_from_the_header_alone(encode, fmt):
    data = encode(Image.new("RGB", (64, 48), (200, 30, 30)))
    side = 30000 if fmt == "HEIF" else 12000  # libavif itself refuses more than 16384 x 16384
    bomb = with_size(data, side, side)
    with pytest.raises(ValueError, match=f"image is {side}x{side} = {side * side} pixels, over the limit of 100000000"):
        decode(bomb, 10**8)
    if fmt == "HEIF":
        with pytest.raises(ValueError, match="could not decode this HEIF image"):
            decode(bomb, 10**9)  # allowed: libheif finds 64 x 48 in it, not the header's size
    else:  # libavif scales what it decodes to the header's size: that size is what the limit must see
        assert decode(with_size(data, 160, 120), 10**8).shape == (120, 160, 3)
    # The coded pixels cut off: the size is still read, so nothing was decoded to read it.
    cut = data[: data.index(b"mdat") + 8]
    assert read_header(cut) == (fmt, 64, 48)
    with pytest.raises(ValueError, match=f"could not decode this {fmt} image"):
        decode(cut, 10**8)


def test_an_avif_over_libavifs_own_limit_is_refused_from_its_header():
    bomb = with_size(avif(Image.new("RGB", (64, 48))), 30000, 30000)
    with pytest.raises(ValueError, match="corrupt AVIF header"):
        read_header(bomb)


def test_a_phone_like_tiled_heic_is_read():
    im = rgb_photo()
    data = heic(im, quality=90, tile_size=128)  # phones store HEIC as a grid of tiles
    assert b"grid" in data
    img = decode(data, 10**8)
    assert img.shape == (300, 451, 3) and np.abs(img.astype(int) - np.asarray(im)).mean() < 3


@pytest.mark.parametrize("brands, fmt", [
    (b"heic\0\0\0\0mif1heic", "HEIF"), (b"mif1\0\0\0\0mif1heic", "HEIF"), (b"heix\0\0\0\0", "HEIF"),
    (b"avif\0\0\0\0avifmif1miaf", "AVIF"), (b"mif1\0\0\0\0mif1avif", "AVIF"), (b"avis\0\0\0\0", "AVIF"),
    (b"isom\0\0\0\0isomiso2mp41", None), (b"qt  \0\0\0\0qt  ", None), (b"mp42\0\0\0\0mp42mif1"[:12], None),
])
def test_formats_are_told_by_their_brands(brands, fmt):
    data = struct.pack(">I", 8 + len(brands)) + b"ftyp" + brands + bytes(64)
    assert magic_format(data) == fmt


def test_pnm_magic():
    for data, fmt in ((b"P6\n", "PNM"), (b"P1 ", "PNM"), (b"P5#", "PNM"), (b"P3", "PNM"), (b"P7\n", None),
                      (b"P6x", None), (b"p6\n", None), (b"P0\n", None)):
        assert magic_format(data) == fmt, data


def test_a_directory_lists_the_new_extensions(tmp_path):
    names = ["a.ppm", "b.PGM", "c.pbm", "d.pnm", "e.heic", "f.HEIF", "g.avif", "h.jpg"]
    for n in names + ["notes.txt", "clip.mp4"]:
        (tmp_path / n).write_bytes(b"")
    assert [os.path.basename(p) for p in list_files(str(tmp_path))] == names


def _batch(blobs):
    paths = [f"in{i}" for i in range(len(blobs))]
    schema = pa.schema([pa.field("id", pa.string()), pa.field("path", pa.string()), pa.field("data", pa.binary())])
    return pa.record_batch([pa.array(paths), pa.array(paths), pa.array(blobs, pa.binary())], schema=schema)


def test_the_isolated_workers_decode_them_as_the_process_does_and_under_the_memory_limit():
    im = Image.fromarray(cv2.resize(np.asarray(rgb_photo()), (90, 60)))
    blobs = [heic(im), avif(im), cv2.imencode(".ppm", photo())[1].tobytes()]
    rows, dead = DecodeImage().process(_batch(blobs))
    assert dead.num_rows == 0
    for data, got in zip(blobs, rows.column("image").to_pylist()):
        img = np.frombuffer(got["data"], np.uint8).reshape(got["height"], got["width"], 3)
        assert np.array_equal(img, decode(data, 10**8))
    # 48 MB of pixels in a 4 KB file: a memory dead letter, the run goes on
    big = heic(Image.new("RGB", (4000, 4000), (120, 120, 120)), quality=0, enc_params={"preset": "ultrafast"})
    rows, dead = DecodeImage(memory_limit=64 << 20).process(_batch([big, blobs[0]]))
    assert rows.num_rows == 1 and dead.column("error")[0].as_py().startswith("memory: ")

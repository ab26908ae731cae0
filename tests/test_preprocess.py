"""Decoding and resizing: every odd or broken file is scored or dead-lettered with a reason."""
from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest

from badfiles import EXPECTED, make_all, photo, png_bomb
from beamzoo.core.graph import Graph
from beamzoo.transforms.sources import Files
from conftest import paths_batch
from beamzoo.core.schemas import DEAD_LETTER_SCHEMA
from beamzoo.transforms.io import ReadFiles, list_files
from beamzoo.imaging import decode, resize_crop
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_all(d)
    return d


def run_chain(steps, paths):
    """Run ``steps`` on a batch of ``paths``: (surviving rows, all dead letters as a Table)."""
    batch = paths_batch(paths)
    dead = []
    for step in steps:
        batch, dl = step.process(batch)
        assert dl.schema.equals(DEAD_LETTER_SCHEMA)
        dead.append(dl)
    return batch, pa.Table.from_batches(dead, schema=DEAD_LETTER_SCHEMA)


def test_each_odd_file_is_scored_or_dead_lettered_with_a_reason(bad_dir):
    paths = list_files(str(bad_dir / "*"))
    steps = [ReadFiles(), DecodeImage(max_pixels=50_000_000, min_side=256), ResizeCrop()]
    rows, dead = run_chain(steps, paths)
    outcome = {p.split("/")[-1]: "ok" for p in rows.column("path").to_pylist()}
    for p, stage, err in zip(*(dead.column(c).to_pylist() for c in ("source", "stage", "error"))):
        outcome[p.split("/")[-1]] = stage
        assert err and ":" in err
    assert outcome == EXPECTED
    assert rows.num_rows + dead.num_rows == len(paths)


@pytest.mark.parametrize("name, reason", [
    ("empty.jpg", "empty file"), ("text.jpg", "not an image in a known format"),
    ("truncated.jpg", "truncated JPEG"), ("truncated.png", "corrupt or truncated"),
    ("bomb.png", "20000x20000 = 400000000 pixels, over the limit of 50000000"),
])
def test_dead_letter_reasons_say_what_was_wrong(bad_dir, name, reason):
    _, dead = run_chain([ReadFiles(), DecodeImage(max_pixels=50_000_000)], [str(bad_dir / name)])
    assert dead.num_rows == 1
    assert reason in dead.column("error")[0].as_py()


def test_pixel_limit_is_checked_before_decoding():
    # 20000 x 20000 declared in 100 bytes: refused from the header alone.
    bomb = png_bomb(20000, 20000)
    with pytest.raises(ValueError, match="20000x20000 = 400000000 pixels, over the limit of 100000000"):
        decode(bomb, max_pixels=100_000_000)
    # The caller's limit rules, not Pillow's process-wide one: allowed, it reaches the decoder.
    with pytest.raises(ValueError, match="could not decode this PNG"):
        decode(bomb, max_pixels=500_000_000)
    ok = cv2.imencode(".png", photo())[1].tobytes()
    with pytest.raises(ValueError, match="over the limit of 1000 "):
        decode(ok, max_pixels=1000)


def test_exif_orientation_is_applied(bad_dir):
    img = decode((bad_dir / "exif_rotated.jpg").read_bytes(), 10**8)
    h, w = photo().shape[:2]
    assert img.shape == (w, h, 3)  # portrait after rotation


def test_sixteen_bit_gray_and_rgba_become_8bit_rgb(bad_dir):
    ref = decode((bad_dir / "good.png").read_bytes(), 10**8)
    for name in ("deep16.png", "gray.png", "rgba.png"):
        img = decode((bad_dir / name).read_bytes(), 10**8)
        assert img.dtype == np.uint8 and img.shape == ref.shape
    deep = decode((bad_dir / "deep16.png").read_bytes(), 10**8)
    assert np.abs(deep.astype(int) - ref).max() <= 1
    assert np.array_equal(decode((bad_dir / "rgba.png").read_bytes(), 10**8), ref)


def test_channel_order_rgb_vs_bgr(bad_dir):
    data = (bad_dir / "good.png").read_bytes()
    assert np.array_equal(decode(data, 10**8, channels="RGB"), decode(data, 10**8, channels="BGR")[..., ::-1])


def test_reduced_jpeg_decode_never_goes_below_min_side(bad_dir):
    data = (bad_dir / "large.jpg").read_bytes()  # 1800 x 1200
    assert decode(data, 10**8).shape[:2] == (1200, 1800)
    assert decode(data, 10**8, min_side=256).shape[:2] == (300, 450)  # 1/4 scale
    assert decode(data, 10**8, min_side=600).shape[:2] == (600, 900)  # 1/2 scale
    assert decode(data, 10**8, min_side=700).shape[:2] == (1200, 1800)


def test_resize_crop_short_side_then_centre():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 140:160] = 255  # a white bar in the centre
    out = resize_crop(img, resize=64, crop=56)
    assert out.shape == (56, 56, 3)
    assert out[:, 28].min() == 255 and out[:, 0].max() == 0


def test_resize_crop_output_contract_and_values(bad_dir):
    rows, dead = run_chain([ReadFiles(), DecodeImage(), ResizeCrop(resize=40, crop=32)],
                           [str(bad_dir / "good.png")])
    assert dead.num_rows == 0
    x = rows.column("pixels").to_numpy_ndarray()
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    nhwc = run_chain([ReadFiles(), DecodeImage(), ResizeCrop(resize=40, crop=32, layout="NHWC")],
                     [str(bad_dir / "good.png")])[0].column("pixels").to_numpy_ndarray()
    assert np.allclose(nhwc[0].transpose(2, 0, 1), x[0])


def test_shrink_filter_area_or_linear():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 400, 3), np.uint8)
    area, linear = resize_crop(img, 150, 128, "area"), resize_crop(img, 150, 128, "linear")
    assert np.array_equal(area, cv2.resize(img, (200, 150), interpolation=cv2.INTER_AREA)[11:139, 36:164])
    assert np.array_equal(linear, cv2.resize(img, (200, 150), interpolation=cv2.INTER_LINEAR)[11:139, 36:164])
    assert ResizeCrop(shrink="linear").result_params() != ResizeCrop().result_params()  # a new graph version
    with pytest.raises(ValueError, match="ResizeCrop: shrink must be one of area, linear, got 'cubic'"):
        ResizeCrop(shrink="cubic")


def test_whole_graph_schema_is_checked(bad_dir):
    g = Graph.source(Files(str(bad_dir / "*.png"))) | ReadFiles() | DecodeImage() | ResizeCrop()
    assert g.schema.names == ["id", "path", "pixels"]


def test_decode_resize_gives_the_same_pixels_as_the_two_steps(bad_dir):
    from beamzoo.transforms.preprocess import DecodeResize
    paths = [str(bad_dir / n) for n in ("good.jpg", "large.jpg", "exif_rotated.jpg", "gray.png", "text.jpg")]
    for layout, channels, shrink in (("NCHW", "RGB", "area"), ("NHWC", "BGR", "linear")):
        resize = ResizeCrop(resize=64, crop=56, layout=layout, channels=channels, value_range=(0, 1),
                            shrink=shrink)
        two, dead2 = run_chain([ReadFiles(), DecodeImage(min_side=64, channels=channels), resize], paths)
        one, dead1 = run_chain([ReadFiles(), DecodeResize(**resize.params, id="decode")], paths)
        assert one.schema.equals(two.schema, check_metadata=True)
        assert np.array_equal(one.column("pixels").to_numpy_ndarray(), two.column("pixels").to_numpy_ndarray())
        assert dead1.to_pylist() == dead2.to_pylist()


def test_a_jpeg_with_bytes_after_its_end_is_scored_and_a_truncated_one_is_not(tmp_path):
    jpeg = cv2.imencode(".jpg", photo())[1].tobytes()
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4000  # a motion photo's appended MP4
    img = decode(jpeg + video, 10**8)
    assert img.shape == photo().shape
    assert np.array_equal(img, decode(jpeg, 10**8))
    with pytest.raises(ValueError, match="truncated JPEG"):
        decode(jpeg[: len(jpeg) // 2] + b"\x00" * 2048, 10**8)  # cut, then padding: no end-of-image marker


def test_only_formats_beamzoo_reads_reach_a_decoder_and_only_as_what_their_magic_says():
    from beamzoo.imaging import magic_format
    ras = cv2.imencode(".ras", photo())[1].tobytes()  # Sun raster
    assert cv2.imdecode(np.frombuffer(ras, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV would decode it
    with pytest.raises(ValueError, match="not an image in a known format: beamzoo reads JPEG, PNG, GIF, BMP, TIFF, "
                                         "WEBP, PNM, HEIF, AVIF"):
        decode(ras, 10**8)
    jpeg = cv2.imencode(".jpg", photo())[1].tobytes()
    with pytest.raises(ValueError, match="corrupt TIFF header"):
        decode(b"II*\x00" + jpeg, 10**8)  # says TIFF: read as a TIFF or not at all
    for ext, fmt in ((".jpg", "JPEG"), (".png", "PNG"), (".bmp", "BMP"), (".tiff", "TIFF"), (".webp", "WEBP")):
        assert magic_format(cv2.imencode(ext, photo())[1].tobytes()) == fmt

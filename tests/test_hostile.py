"""Hostile and odd inputs: each ends as a prediction or a dead letter, and nothing hangs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import cv2
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import badfiles
from badfiles import photo
from beamzoo.pipeline import score_images
from beamzoo.transforms.io import ReadFiles, list_files
from beamzoo.imaging import decode
from beamzoo.transforms.preprocess import DecodeImage, ResizeCrop
from conftest import write_colour_image
from test_preprocess import run_chain
import test_formats
from conftest import read, run_graph



def process(steps, paths):
    rows, dead = run_chain(steps, paths)
    return rows, dead.to_pylist()


def test_cyclic_and_deep_symlinks_end_and_list_each_file_once(tmp_path):
    d = tmp_path / "d"
    deep = d.joinpath(*[f"n{i}" for i in range(60)])
    deep.mkdir(parents=True)
    write_colour_image(deep / "deep.png", (200, 0, 0))
    write_colour_image(d / "top.png", (200, 0, 0))
    os.symlink(d, d / "n0" / "up")           # a cycle back to the top
    os.symlink(d / "n0", d / "n0" / "n1" / "again")  # a second cycle: glob would explode
    os.symlink("missing", d / "dangling.png")
    os.symlink(d / "self", d / "self")       # a link to itself
    for pattern in (str(d), str(d / "**" / "*.png")):
        found = list_files(pattern)  # the dangling link is listed: it becomes a dead letter
        assert found == [str(d / "dangling.png"), str(deep / "deep.png"), str(d / "top.png")]


def test_fifos_devices_and_dangling_links_are_dead_letters_not_hangs(tmp_path, tiny_model):
    d = tmp_path / "odd"
    d.mkdir()
    write_colour_image(d / "fine.png", (200, 0, 0))
    os.mkfifo(d / "fifo.png")  # opening it for reading would wait for a writer forever
    os.symlink("/dev/zero", d / "zero.png")  # endless bytes
    os.symlink("missing", d / "dangling.png")
    stats = run_graph(score_images(str(d / "*"), str(tmp_path / "out"), tiny_model, topk=3))
    assert (stats.inputs, stats.scored, stats.failed) == (4, 1, 3)
    reasons = {os.path.basename(r["source"]): (r["stage"], r["error"]) for r in read(tmp_path / "out", "dead_letter")}
    assert reasons["fifo.png"] == ("classify/read", "ValueError: not a regular file (a FIFO); only regular files are read")
    assert reasons["zero.png"] == ("classify/read", "ValueError: not a regular file (a device); only regular files are read")
    assert reasons["dangling.png"][0] == "classify/read" and "FileNotFoundError" in reasons["dangling.png"][1]


def test_unreadable_file_is_a_read_dead_letter(tmp_path):
    d = tmp_path / "perm"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    secret = write_colour_image(d / "secret.png", (200, 0, 0))
    os.chmod(secret, 0)

    def attempt(path=secret):
        rows, dead = process([ReadFiles()], [path])
        return rows.num_rows, dead

    attempt(str(d / "missing.png"))  # the same code path once here: the child can import nothing
    n, dead = run_as_nobody(attempt) if os.geteuid() == 0 else attempt()
    assert n == 0 and dead[0]["stage"] == "read" and "PermissionError" in dead[0]["error"]


def run_as_nobody(fn):
    """Run ``fn`` in a forked child with the rights of user nobody; returns its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"child failed": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_non_utf8_and_very_long_names(tmp_path, tiny_model):
    d = tmp_path / "names"
    d.mkdir()
    write_colour_image(d / "plain.png", (200, 0, 0))
    long_name = "x" * 240 + ".png"
    write_colour_image(d / long_name, (0, 200, 0))
    weird = "line\nbreak ü .. %FF.png"
    write_colour_image(d / weird, (0, 0, 200))
    with open(os.path.join(os.fsencode(d), b"bad\xff\xfename.png"), "wb") as f:
        f.write((d / "plain.png").read_bytes())
    stats = run_graph(score_images(str(d / "*"), str(tmp_path / "out"), tiny_model, topk=3))
    assert (stats.inputs, stats.scored, stats.failed) == (4, 3, 1)
    labels = {os.path.basename(r["path"]): r["label"] for r in read(tmp_path / "out")}
    assert labels == {"plain.png": "red", long_name: "green", weird: "blue"}
    [dead] = read(tmp_path / "out", "dead_letter")
    assert dead["stage"] == "list" and dead["source"].endswith("bad\\xff\\xfename.png")
    assert "not valid UTF-8" in dead["error"]
    # No input name wrote anything outside the output directory.
    assert sorted(os.listdir(tmp_path)) == ["names", "out", "tiny.onnx"]
    assert sorted(os.listdir(tmp_path / "out")) == [".beamzoo.lock", "dead_letter", "predictions"]
    assert all(f.startswith("part-") for sub in ("dead_letter", "predictions")
               for f in os.listdir(tmp_path / "out" / sub))


def test_files_that_vanish_or_change_after_listing(tmp_path, tiny_model):
    d = tmp_path / "moving"
    d.mkdir()
    gone = write_colour_image(d / "gone.png", (200, 0, 0))
    changed = write_colour_image(d / "changed.png", (200, 0, 0))
    paths = list_files(str(d / "*"))
    os.unlink(gone)
    write_colour_image(changed, (0, 0, 200))
    rows, dead = process([ReadFiles(), DecodeImage()], paths)
    assert rows.column("path").to_pylist() == [changed]
    assert dead[0]["source"] == gone and "FileNotFoundError" in dead[0]["error"]


def test_extreme_aspect_ratios_are_scored(tmp_path, tiny_model):
    d = tmp_path / "thin"
    d.mkdir()
    write_colour_image(d / "wide.png", (200, 0, 0), size=(10000, 1))
    write_colour_image(d / "tall.png", (0, 200, 0), size=(1, 10000))
    stats = run_graph(score_images(str(d / "*"), str(tmp_path / "out"), tiny_model, topk=3))
    assert (stats.scored, stats.failed) == (2, 0)
    labels = {os.path.basename(r["path"]): r["label"] for r in read(tmp_path / "out")}
    assert labels == {"wide.png": "red", "tall.png": "green"}


def test_cmyk_jpeg_decodes_to_the_right_colours(tmp_path):
    rgb = cv2.cvtColor(photo(), cv2.COLOR_BGR2RGB)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    img = decode((tmp_path / "cmyk.jpg").read_bytes(), 10**8)
    assert img.shape == rgb.shape
    assert np.abs(img.astype(int) - rgb).mean() < 8


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animated_images_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (64, 48), c) for c in ((220, 0, 0), (0, 0, 220), (0, 220, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    img = decode(path.read_bytes(), 10**8)
    assert img.shape == (48, 64, 3)
    r, g, b = img.reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 60 and b < 60  # red, the first frame


@pytest.mark.slow
def test_a_directory_with_100000_entries(tmp_path, tiny_model):
    d = tmp_path / "crowd"
    d.mkdir()
    png = cv2.imencode(".png", np.full((8, 8, 3), (0, 0, 200), np.uint8))[1].tobytes()
    for i in range(100_000):
        with open(d / f"{i:06d}.{'png' if i % 10_000 == 0 else 'txt'}", "wb") as f:
            f.write(png if i % 10_000 == 0 else b"")
    assert len(list_files(str(d / "*"))) == 100_000
    assert len(list_files(str(d))) == 10  # a directory means its images
    from beamzoo.runners.edge import EdgeRunner
    stats = run_graph(score_images(str(d / "*"), str(tmp_path / "out"), tiny_model, topk=3, batch_size=64),
                      edge=EdgeRunner(chunk_size=256, progress=False), max_dead_fraction=1.0)  # junk, on purpose
    assert (stats.inputs, stats.scored, stats.failed) == (100_000, 10, 99_990)


SEED_JPEG = cv2.imencode(".jpg", cv2.resize(photo(), (64, 48)), [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
SEED_PNG = cv2.imencode(".png", cv2.resize(photo(), (40, 30)))[1].tobytes()


def _pil(fmt: str, **kw) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(cv2.resize(photo(), (40, 30)), cv2.COLOR_BGR2RGB)).save(buf, fmt, **kw)
    return buf.getvalue()


# every format beamzoo accepts (JPEG baseline and progressive), and files made to cost time or memory
SEEDS = [SEED_JPEG, SEED_PNG, _pil("JPEG", progressive=True), _pil("GIF"), _pil("TIFF", compression="tiff_lzw")]
SEEDS += [cv2.imencode(ext, cv2.resize(photo(), (40, 30)))[1].tobytes() for ext in (".webp", ".tiff", ".bmp")]
SEED_HEIC = test_formats.heic(Image.fromarray(cv2.cvtColor(cv2.resize(photo(), (40, 30)), cv2.COLOR_BGR2RGB)))
SEED_AVIF, SEED_PPM = _pil("AVIF", quality=60), _pil("PPM")
SEED_PLAIN_PGM = cv2.imencode(".pgm", cv2.cvtColor(cv2.resize(photo(), (40, 30)), cv2.COLOR_BGR2GRAY),
                              [cv2.IMWRITE_PXM_BINARY, 0])[1].tobytes()
SEEDS += [SEED_HEIC, SEED_AVIF, SEED_PPM, SEED_PLAIN_PGM, b"P4\n40 30\n" + bytes(range(150))]
BOMBS = [badfiles.png_bomb(6000, 5000), badfiles.jpeg_many_scans(3000), badfiles.tiff_lying_size(3000, 3000, 10, 10)]
FUZZ_LIMITS = dict(max_pixels=30_000_000, time_limit=1.0, memory_limit=64 << 20)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS * 10 + BOMBS)))  # now and then a bomb
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "header" and len(data) > 24:  # mess with declared sizes
            data[16:24] = draw(st.binary(min_size=8, max_size=8))
    return bytes(data)


def test_png_chunk_declaring_more_bytes_than_the_file_is_refused_before_decoding(tmp_path):
    at = SEED_PNG.index(b"IDAT") - 4
    blob = SEED_PNG[:at] + b"\x71" + SEED_PNG[at + 1:]  # IDAT now declares ~1.9 GB
    (tmp_path / "bad.png").write_bytes(blob)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the (forked) parent's peak across exec
    code = ("import sys; from beamzoo.imaging import decode\n"
            "try:\n    decode(open(sys.argv[1], 'rb').read(), 4_000_000)\n"
            "except ValueError as e:\n    print(e)\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bad.png")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("PNG is corrupt or truncated: chunk 'IDAT' declares 18")
    assert int(out[1]) < 500  # MiB: OpenCV would have reserved what the chunk declares


def test_the_fuzz_seeds_cover_every_accepted_format_and_both_limits():
    from beamzoo.imaging import FORMATS, magic_format
    assert {magic_format(s) for s in SEEDS} == set(FORMATS)
    batch = _fuzz_batch(BOMBS)
    _, dl = DecodeImage(min_side=32, **FUZZ_LIMITS).process(batch)
    reasons = dl.column("error").to_pylist()
    assert reasons[0].startswith("memory: ") and reasons[1].startswith("timeout: "), reasons  # the limits fire
    assert dl.column("stage").to_pylist() == ["decode"] * 3  # the lying TIFF too (tests/test_limits.py)


def _fuzz_batch(blobs):
    paths = [f"fuzz{i}" for i in range(len(blobs))]
    schema = pa.schema([pa.field("id", pa.string()), pa.field("path", pa.string()), pa.field("data", pa.binary())])
    return pa.record_batch([pa.array(paths), pa.array(paths), pa.array(blobs, pa.binary())], schema=schema)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Truncated File Read:UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=1, max_size=4))
def test_mutated_image_bytes_never_crash_or_hang(blobs):
    """Each example is decoded under the time and memory limits (in worker processes): it
    ends as an image or a dead letter, and the run goes on."""
    batch = _fuzz_batch(blobs)
    paths = batch.column("path").to_pylist()
    result = {}

    def work():
        rows, dead = batch, []
        for step in (DecodeImage(min_side=32, **FUZZ_LIMITS), ResizeCrop(resize=36, crop=32)):
            rows, dl = step.process(rows)
            dead += dl.column("source").to_pylist()
            assert all(dl.column("error").to_pylist())
        result["rows"], result["dead"] = rows.column("path").to_pylist(), dead

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(60)  # a hang detector: 4 inputs at 1 s each, and their workers replaced
    assert not t.is_alive(), "decoding hung"
    seen = result["rows"] + result["dead"]
    assert sorted(seen) == sorted(paths)


def test_more_than_2_gib_of_files_in_one_chunk_and_on_resume(tmp_path, tiny_model):
    """15 files of 150 MB (a red JPEG, then a sparse hole) in one 16-row chunk: 2.25 GB, over
    Arrow's 2 GiB binary limit. They are read in pieces of at most batch_bytes, so the run (and
    its resume, with two more) ends, and little more than a file or two is in memory at once."""
    from beamzoo.runners.edge import EdgeRunner
    d = tmp_path / "big"
    d.mkdir()
    red = cv2.imencode(".jpg", np.full((48, 64, 3), (0, 0, 200), np.uint8))[1].tobytes()

    def big(name):
        with open(d / name, "wb") as f:
            f.write(red)
            f.truncate(150 << 20)

    for i in range(15):
        big(f"{i:02d}.jpg")
    graph = score_images(str(d / "*.jpg"), str(tmp_path / "out"), tiny_model, topk=3, max_bytes=200 << 20)
    edge = EdgeRunner(workers=1, chunk_size=16, progress=False)
    stats = run_graph(graph, edge=edge)
    assert (stats.inputs, stats.scored, stats.failed) == (15, 15, 0)
    big("15.jpg"), big("16.jpg")
    stats = run_graph(graph, edge=edge, resume=True)
    assert (stats.scored, stats.failed, stats.skipped) == (2, 0, 15)
    rows = read(tmp_path / "out")
    assert len(rows) == 17 and {r["label"] for r in rows} == {"red"}


# PNM, HEIF and AVIF: random bytes after their magic, and every way of cutting them short

def _new_format_magics():
    heic_meta = SEED_HEIC.index(b"meta")
    return [b"P1\n", b"P2 ", b"P3\n", b"P4\n", b"P5 ", b"P6\n", b"P6\n40 30\n255\n", b"P5\n40 30\n65535\n",
            b"P3\n# c\n40 30\n1000\n", b"P4\n60000 60000\n", SEED_HEIC[:heic_meta - 4], SEED_HEIC[:heic_meta + 60],
            SEED_HEIC[:len(SEED_HEIC) // 2], SEED_AVIF[:SEED_AVIF.index(b"meta") - 4], SEED_AVIF[:len(SEED_AVIF) // 2]]


NEW_MAGICS = _new_format_magics()


def _decode_isolated(blobs):
    """(decoded paths, dead-letter reasons by path) of DecodeImage under FUZZ_LIMITS, in its workers;
    fails if it hangs."""
    batch = _fuzz_batch(blobs)
    result = {}

    def work():
        rows, dl = DecodeImage(min_side=32, **FUZZ_LIMITS).process(batch)
        result["rows"] = rows.column("path").to_pylist()
        result["dead"] = dict(zip(dl.column("source").to_pylist(), dl.column("error").to_pylist()))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "decoding hung"
    return result["rows"], result["dead"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(NEW_MAGICS), st.binary(max_size=4000)), min_size=1, max_size=4))
def test_random_bytes_after_a_pnm_heif_or_avif_magic_never_crash(items):
    from beamzoo.imaging import magic_format
    blobs = [magic + tail for magic, tail in items]
    assert {magic_format(b) for b in blobs} <= {"PNM", "HEIF", "AVIF"}  # told by the magic alone
    rows, dead = _decode_isolated(blobs)
    assert sorted(rows + list(dead)) == sorted(f"fuzz{i}" for i in range(len(blobs)))
    assert all(dead.values())


@pytest.mark.parametrize("seed", ["SEED_HEIC", "SEED_AVIF", "SEED_PPM", "SEED_PLAIN_PGM"])
def test_truncated_pnm_heif_and_avif_files_are_dead_letters(seed):
    data = globals()[seed]
    cuts = sorted({*range(0, 40), *range(40, len(data), max(1, len(data) // 60))})
    rows, dead = _decode_isolated([data[:n] for n in cuts] + [data])
    whole = f"fuzz{len(cuts)}"
    assert rows[-1:] == [whole]  # the whole file decodes
    if seed != "SEED_PLAIN_PGM":  # a plain PGM cut inside its last number still holds as many numbers
        assert rows == [whole]
    assert len(rows) + len(dead) == len(cuts) + 1 and all(dead.values())
    assert not any("crash" in reason or "timeout" in reason for reason in dead.values()), dead


def test_heif_and_avif_bombs_hit_the_limits_not_the_runner():
    """A 4 KB HEIC of 4000 x 4000 and a 1 KB AVIF whose header says 5000 x 5000 (libavif scales
    its 40 x 30 up to that): over the 64 MB memory limit, dead letters of step decode."""
    big = test_formats.heic(Image.new("RGB", (4000, 4000), (120, 120, 120)), quality=0,
                            enc_params={"preset": "ultrafast"})
    rows, dead = _decode_isolated([big, test_formats.with_size(SEED_AVIF, 5000, 5000), SEED_HEIC])
    assert rows == ["fuzz2"]
    assert dead["fuzz0"].startswith("memory: "), dead
    assert dead["fuzz1"].startswith("memory: "), dead

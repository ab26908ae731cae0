"""Per-input time and memory limits, enforced outside the decoder: real bombs, real worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import badfiles
from beamzoo.core import KnobError
from beamzoo.pipeline import score_images
from beamzoo.transforms.io import ReadFiles
from beamzoo.transforms.preprocess import DecodeImage, DecodeResize
from conftest import error_line, read, run_graph, write_colour_image
from test_preprocess import run_chain

ROOT = Path(__file__).resolve().parent.parent


def outcome(out) -> dict[str, tuple[str, str]]:
    rows = {os.path.basename(r["path"]): ("ok", r["label"]) for r in read(out)}
    rows.update({os.path.basename(r["source"]): (r["stage"], r["error"]) for r in read(out, "dead_letter")})
    return rows


@pytest.mark.parametrize("runner", ["EdgeRunner", "DirectRunner"])
def test_bombs_over_the_limits_are_dead_letters_and_the_run_goes_on(tmp_path, tiny_model, runner):
    d = tmp_path / "in"
    d.mkdir()
    write_colour_image(d / "a_red.png", (200, 0, 0))
    (d / "b_memory.png").write_bytes(badfiles.png_bomb(20000, 20000))  # 1.2 GB of pixels; the header is honest
    (d / "c_cpu.jpg").write_bytes(badfiles.jpeg_many_scans(3000))  # tens of KB, seconds of CPU
    write_colour_image(d / "d_blue.png", (0, 0, 200))
    graph = score_images(str(d / "*"), str(tmp_path / "out"), tiny_model, topk=3, max_pixels=700_000_000,
                         time_limit=1.0, memory_limit=512 << 20)
    stats = run_graph(graph, runner)
    seen = outcome(tmp_path / "out")
    assert (stats.inputs, stats.scored, stats.failed) == (4, 2, 2)
    assert seen["a_red.png"] == ("ok", "red") and seen["d_blue.png"] == ("ok", "blue")
    stage, reason = seen["b_memory.png"]
    assert stage == "classify/decode" and reason.startswith("memory: "), reason
    stage, reason = seen["c_cpu.jpg"]
    assert stage == "classify/decode" and reason.startswith("timeout: "), reason


@pytest.fixture
def stalling_server():
    """A real HTTP server on 127.0.0.1: ``/NAME`` serves that image of ``files``; for
    ``/stall/NAME`` it sends the headers and 100 bytes, then nothing until released
    (60 s at most). Yields (url, files, released, stalled)."""
    import http.server
    import threading
    files, release, stalled = {}, threading.Event(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            body = files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path.startswith("/stall/"):
                self.wfile.write(body[:100])
                self.wfile.flush()
                stalled.set()
                release.wait(60)
                body = body[100:]
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, release, stalled
    release.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("runner", ["EdgeRunner", "DirectRunner"])
def test_a_read_that_stalls_is_a_dead_letter_and_the_run_goes_on(tmp_path, tiny_model, stalling_server, runner):
    """The server holds the stalled read open until the test ends, so the run can only
    have finished because the read's time limit gave up on it."""
    url, files, release, stalled = stalling_server
    for name, rgb in (("red.png", (200, 0, 0)), ("blue.png", (0, 0, 200))):
        write_colour_image(tmp_path / name, rgb)
        files[name] = (tmp_path / name).read_bytes()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri\n{url}/red.png\n{url}/stall/blue.png\n{tmp_path / 'blue.png'}\n")
    graph = score_images(str(manifest), str(tmp_path / "out"), tiny_model, topk=3, time_limit=1.0)
    stats = run_graph(graph, runner)
    assert stalled.is_set() and not release.is_set()  # the stalled read is still open
    assert (stats.inputs, stats.scored, stats.failed) == (3, 2, 1)
    assert sorted(r["label"] for r in read(tmp_path / "out")) == ["blue", "red"]
    [dead] = read(tmp_path / "out", "dead_letter")
    assert (dead["source"], dead["stage"]) == (f"{url}/stall/blue.png", "classify/read")
    assert dead["error"] == "timeout: reading took over 1 s (raise time_limit to allow more)"


def test_the_cpu_bomb_decodes_without_limits_so_the_limit_is_what_stopped_it(tmp_path):
    """The file is a real (slow) JPEG: with the limits off it decodes."""
    bomb = tmp_path / "cpu.jpg"
    bomb.write_bytes(badfiles.jpeg_many_scans(30))
    rows, dead = run_chain([ReadFiles(), DecodeImage(isolate=False)], [str(bomb)])
    assert rows.num_rows == 1 and dead.num_rows == 0


def test_a_tiff_whose_header_lies_is_refused_by_what_decodes(tmp_path):
    """Pillow reads 10x10 from the duplicate tags, libtiff 4000x4000 (16 MP, over max_pixels):
    the workers' OpenCV refuses it by its own limit; in-process, the decoded size is checked."""
    path = tmp_path / "liar.tif"
    path.write_bytes(badfiles.tiff_lying_size(4000, 4000, 10, 10))
    for isolate, words in ((True, "pixels <= CV_IO_MAX_IMAGE_PIXELS"),
                           (False, "ValueError: this TIFF decoded to 4000x4000, more pixels than its header's "
                                   "10x10: the file is not what its header says")):
        rows, dead = run_chain([ReadFiles(), DecodeImage(max_pixels=1_000_000, isolate=isolate)], [str(path)])
        assert rows.num_rows == 0 and dead.column("stage")[0].as_py() == "decode"
        assert words in dead.column("error")[0].as_py()
    rows, dead = run_chain([ReadFiles(), DecodeImage(max_pixels=16_000_000)], [str(path)])
    assert "is not what its header says" in dead.column("error")[0].as_py()  # OpenCV's limit let it through


@pytest.mark.parametrize("knobs, words", [({"time_limit": 0}, "time_limit must be >= 0.01s, got 0s"),
                                          ({"memory_limit": 1 << 20}, "memory_limit must be >= 64M, got 1M"),
                                          ({"isolate": "yes"}, "isolate must be true or false, got 'yes'")])
def test_limit_knobs_are_checked(knobs, words):
    for make in (DecodeImage, DecodeResize):
        with pytest.raises(KnobError, match=words):
            make(**knobs)


@pytest.mark.parametrize("args, words", [
    (["--time_limit", "0"], "--time_limit: must be >= 0.01s, got 0s"),
    (["--time_limit", "soon"], "--time_limit: 'soon' is not a number of seconds"),
    (["--memory_limit", "10M"], "--memory_limit: must be >= 64M, got 10M"),
    (["--memory_limit", "lots"], "--memory_limit: 'lots' is not a size"),
    (["--no_isolation", "--time_limit", "2"], "--no_isolation turns the limits off"),
])
def test_limit_flags_are_checked_with_one_error_line(tmp_path, args, words):
    out = subprocess.run([sys.executable, "pipelines/score_images.py", "--output", str(tmp_path / "o"), *args],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=120)
    assert out.returncode == 2 and words in error_line(out.stderr), out.stderr


def test_a_reader_thread_ends_with_the_thread_it_reads_for(tmp_path):
    """Each thread that reads gets a reader thread of its own; it must not outlive it
    (a run's worker threads end with the run)."""
    import threading

    from beamzoo.transforms.io import read_within
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    before, seen = set(threading.enumerate()), []

    def reads():
        seen.append(read_within(str(f), 10, 5.0))
        seen.extend(t for t in threading.enumerate() if t.name == "beamzoo-read" and t not in before)

    owner = threading.Thread(target=reads)
    owner.start()
    owner.join()
    data, reader = seen
    assert data == b"abc"
    reader.join(10)
    assert not reader.is_alive()


def test_the_decode_limit_is_cpu_time_so_a_busy_machine_does_not_refuse_a_good_image(tmp_path):
    """With three processes spinning on two cores, a good image that takes 0.7 s of CPU (so well
    over a second of wall time) to decode is scored all the same, and a CPU bomb is still refused:
    the limit measures the worker's CPU time (wall time only far above it, for a worker stuck in
    the kernel)."""
    import cv2
    import numpy as np
    from beamzoo.transforms.isolated import WALL_MIN
    big = np.random.default_rng(0).integers(0, 255, (6000, 7000, 3), np.uint8)  # noise: JPEG's worst case
    good = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    batch = pa.record_batch([pa.array(["good", "bomb"]), pa.array(["good", "bomb"]),
                             pa.array([good, badfiles.jpeg_many_scans(3000)], pa.binary())],
                            names=["id", "path", "data"])
    step = DecodeImage(max_pixels=700_000_000, time_limit=1.0)
    step.setup()  # the workers start before the machine gets busy
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        ok, dead = step.process(batch)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert ok.column("id").to_pylist() == ["good"]
    (reason,) = dead.column("error").to_pylist()
    assert reason.startswith("timeout: over the CPU limit of 1 s"), reason
    assert WALL_MIN >= 30

"""What running decode+resize in beamzoo.isolate's worker processes costs.

    python bench/isolate_cost.py [--n 300] [--threads 2] [--workers 2] [--chunk 16] [--cv2-threads T]

N JPEGs are made in memory from the sample photographs (``beamzoo.samples``),
scaled to 640x480 .. 1600x1200 (4:3, either orientation), quality 75..95. Each
is decoded (``decode(data, 100_000_000, 256, "BGR")``, reduced-scale where it
can) and resized + centre-cropped (``resize_crop(img, 256, 224)``), by
``--threads`` threads taking chunks of ``--chunk`` images: in the process, or
each thread calling ``IsolatedPool.map`` on its chunk (``--workers`` processes).
Two outputs: the uint8 crop (147 KB) and float32 NCHW pixels in [-1, 1] (602 KB).
Runs are interleaved: in-process, pool, in-process, pool. CPU ms/image: this
process's (all threads; with the pool, the cost of shipping items and results)
and the workers' (/proc), whose sum is less noisy than images/s on a busy machine.
Last, the bare round trip of a result of each size.
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from beamzoo.core.isolate import IsolatedPool, Limits
from beamzoo.samples import sample_files
from beamzoo.imaging import decode, resize_crop

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]
_ECHO = {n: np.ones(n, np.uint8) for n in (1, 224 * 224 * 3, 224 * 224 * 3 * 4)}
if os.environ.get("ISOLATE_COST_CV2_THREADS"):  # --cv2-threads, here and in the workers (which import this file)
    cv2.setNumThreads(int(os.environ["ISOLATE_COST_CV2_THREADS"]))


def crop_uint8(data: bytes) -> np.ndarray:
    return np.ascontiguousarray(resize_crop(decode(data, 100_000_000, 256, "BGR"), 256, 224))


def pixels_float32(data: bytes) -> np.ndarray:
    crop = resize_crop(decode(data, 100_000_000, 256, "BGR"), 256, 224)
    out = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32)
    out *= np.float32(2 / 255)
    out -= np.float32(1)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def echo(n: int) -> np.ndarray:
    return _ECHO[n]


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sample_files()]
    out = []
    for i in range(n):
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        w = int(w * rng.uniform(1.0, 1.1))
        h = w * 3 // 4
        if rng.random() < 0.25:
            w, h = h, w
        img = cv2.resize(photos[i % len(photos)], (w, h), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))])
        out.append(buf.tobytes())
    return out


def cpu_seconds(pids) -> float:
    """User + system CPU of these processes, from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed(run, chunks, threads: int, workers=()) -> tuple[float, float, float]:
    """(images per second, this process's CPU ms per image, the workers' CPU ms per image)."""
    n = sum(len(c) for c in chunks)
    wall, cpu, wcpu = time.perf_counter(), time.process_time(), cpu_seconds(workers)
    with ThreadPoolExecutor(threads) as ex:
        outs = list(ex.map(run, chunks))
    wall, cpu, wcpu = time.perf_counter() - wall, time.process_time() - cpu, cpu_seconds(workers) - wcpu
    assert sum(len(o) for o in outs) == n and all(isinstance(r, np.ndarray) for o in outs for r in o)
    return n / wall, cpu / n * 1000, wcpu / n * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--cv2-threads", type=int, default=None, help="cv2.setNumThreads, in-process and in the workers")
    args = ap.parse_args()
    if args.cv2_threads is not None:
        os.environ["ISOLATE_COST_CV2_THREADS"] = str(args.cv2_threads)
        cv2.setNumThreads(args.cv2_threads)
    t = time.perf_counter()
    jpegs = make_jpegs(args.n)
    chunks = [jpegs[i:i + args.chunk] for i in range(0, len(jpegs), args.chunk)]
    print(f"{len(jpegs)} JPEGs, {sum(map(len, jpegs)) / len(jpegs) / 1000:.0f} KB on average, made in "
          f"{time.perf_counter() - t:.1f} s; {args.threads} threads, chunks of {args.chunk}, "
          f"{args.workers} workers; cv2 threads {cv2.getNumThreads()}, cores {len(os.sched_getaffinity(0))}")
    for fn in (crop_uint8, pixels_float32):
        t = time.perf_counter()
        pool = IsolatedPool(fn, args.workers, Limits())
        pool.map(jpegs[:args.workers])
        print(f"\n{fn.__name__}: pool started and warm in {time.perf_counter() - t:.2f} s")
        rows = {"in-process": (lambda c: [fn(d) for d in c], ()), "IsolatedPool": (pool.map, pool.pids())}
        seen = {name: [] for name in rows}
        for rep in (1, 2):
            for name, (run, workers) in rows.items():
                ips, cpu, wcpu = timed(run, chunks, args.threads, workers)
                seen[name].append(ips)
                print(f"  run {rep} {name:<13} {ips:7.1f} images/s   CPU ms/image: parent {cpu:5.2f}"
                      f" + workers {wcpu:5.2f} = {cpu + wcpu:5.2f}")
        for rep, (a, b) in enumerate(zip(seen["in-process"], seen["IsolatedPool"]), 1):
            print(f"  run {rep} pool / in-process = {b / a:.3f}")
        print(f"  best of each: pool / in-process = {max(seen['IsolatedPool']) / max(seen['in-process']):.3f}")
        pool.close()
    with IsolatedPool(echo, 1, Limits()) as pool:
        print("\nround trip of one item and its result (1 worker, chunks of 16):")
        for size in _ECHO:
            pool.map([size] * 16)
            k, t = 0, time.perf_counter()
            while time.perf_counter() - t < 1.0:
                pool.map([size] * 16)
                k += 16
            print(f"  result of {size:>7} bytes: {(time.perf_counter() - t) / k * 1e6:6.0f} us")


if __name__ == "__main__":
    main()

"""beamzoo serve under load, side by side with the edge runner's batch throughput.

    python bench/serve.py --n 300 --seconds 8 --out bench/results/

On the same seeded JPEGs (bench/images.py): (1) the edge runner scores them
in a fresh process (the batch throughput); (2) ``beamzoo serve`` starts in a
fresh process on 127.0.0.1 and a load generator in this process sends one
image per TF Serving ``:predict`` request: a lone request at a time (its
latency), then closed loops of C concurrent clients for each --concurrency
(throughput, p50, p99), then an open loop at half the saturation throughput
(arrivals on a fixed schedule; latency counted from when a request was due,
so a slow server cannot hide its queue). Every phase is bounded by
--seconds and --max-requests. Prints one table; writes OUT/serve-n{N}.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from images import image_paths, make_set  # noqa: E402

from beamzoo.serve.client import Client  # noqa: E402

MODEL = "efficientnet_lite0"


def batch_child(files: str, out: str, workers: int | None) -> None:
    """The edge runner on the images (run in a fresh process): prints its result as JSON."""
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners import EdgeRunner
    graph = score_images(os.path.join(files, "*.jpg"), out)
    t0 = time.perf_counter()
    stats = run(graph, "EdgeRunner", edge=EdgeRunner(workers=workers, progress=False))
    print(json.dumps({"seconds": time.perf_counter() - t0, "scored": stats.scored, "failed": stats.failed}))


def batch_throughput(files: str, n: int, workers: int | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--batch-child", files, out] + ([str(workers)] if workers else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["images_per_s"] = res["scored"] / res["seconds"]
    return res


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "beamzoo.cli", "serve", "--model", MODEL, "--port", "0",
           "--max_batch", str(args.max_batch), "--max_delay_ms", str(args.max_delay_ms),
           "--max_queue", str(args.max_queue)] + (["--workers", str(args.workers)] if args.workers else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"listening on (http://\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, m.group(1)


def bodies(paths: list[str]) -> list[bytes]:
    return [json.dumps({"instances": [{"b64": base64.b64encode(Path(p).read_bytes()).decode()}]}).encode()
            for p in paths]


PATH = f"/v1/models/{MODEL}:predict"


def send(client: Client, body: bytes) -> bool:
    status, answer = client.request("POST", PATH, raw=body)
    return status == 200 and "label" in answer["predictions"][0]


def closed_loop(url: str, reqs: list[bytes], clients: int, seconds: float, limit: int) -> dict:
    """``clients`` threads, each sending its next request when the last is answered."""
    lat, errors, lock = [], [0], threading.Lock()
    count = iter(range(1 << 62))
    stop = time.perf_counter() + seconds

    def loop():
        with Client(url) as c:
            while time.perf_counter() < stop:
                i = next(count)
                if i >= limit:
                    return
                t = time.perf_counter()
                ok = send(c, reqs[i % len(reqs)])
                with lock:
                    lat.append(time.perf_counter() - t) if ok else errors.__setitem__(0, errors[0] + 1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summary(lat, errors[0], wall, clients=clients)


def open_loop(url: str, reqs: list[bytes], rate: float, seconds: float, limit: int, senders: int = 64) -> dict:
    """Requests due at a fixed rate; latency from when each was due."""
    total = min(limit, max(1, int(rate * seconds)))
    t0 = time.perf_counter() + 0.2
    due = [t0 + i / rate for i in range(total)]
    lat, errors, lock = [], [0], threading.Lock()
    count = iter(range(total))

    def loop():
        with Client(url) as c:
            for i in count:
                wait = due[i] - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                ok = send(c, reqs[i % len(reqs)])
                with lock:
                    lat.append(time.perf_counter() - due[i]) if ok else errors.__setitem__(0, errors[0] + 1)

    threads = [threading.Thread(target=loop) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, errors[0], time.perf_counter() - t0, rate=rate)


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(lat: list[float], errors: int, wall: float, **kw) -> dict:
    return {**kw, "requests": len(lat), "errors": errors, "seconds": wall,
            "images_per_s": len(lat) / wall if wall else 0.0,
            "p50_ms": 1000 * quantile(lat, 0.50) if lat else None,
            "p99_ms": 1000 * quantile(lat, 0.99) if lat else None,
            "mean_ms": 1000 * statistics.fmean(lat) if lat else None}


def fmt(v, spec="8.1f"):
    return format(v, spec) if isinstance(v, (int, float)) else format("n/a", ">8")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--batch-child"]:
        batch_child(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else None)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--n", type=int, default=300, help="images (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--concurrency", default="1,2,4,8,16", help="closed-loop client counts (default 1,2,4,8,16)")
    p.add_argument("--seconds", type=float, default=8.0, help="longest each load phase runs (default 8)")
    p.add_argument("--max-requests", type=int, default=3000, help="most requests in each phase (default 3000)")
    p.add_argument("--lone", type=int, default=40, help="lone requests for the lone latency (default 40)")
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--max_delay_ms", type=float, default=5.0)
    p.add_argument("--max_queue", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="server and edge runner threads (default: cores)")
    p.add_argument("--out", default=None, help="folder for serve-n{N}.json")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    files = make_set(args.cache, args.n, args.seed)
    paths = image_paths(files)
    reqs = bodies(paths)
    print(f"{len(paths)} images; {len(os.sched_getaffinity(0))} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    batch = batch_throughput(str(files), len(paths), args.workers)
    print(f"edge runner (batch): {batch['images_per_s']:.1f} images/s", flush=True)

    proc, url = start_server(args)
    try:
        with Client(url) as c:
            for body in reqs[:8]:  # warm up
                send(c, body)
        lone = closed_loop(url, reqs, 1, args.seconds, args.lone)
        print(f"lone request: p50 {lone['p50_ms']:.1f} ms", flush=True)
        loops = []
        for clients in levels:
            loops.append(closed_loop(url, reqs, clients, args.seconds, args.max_requests))
            r = loops[-1]
            print(f"  {clients:>3} clients: {r['images_per_s']:.1f} images/s  p50 {fmt(r['p50_ms'], '.1f')} ms  "
                  f"p99 {fmt(r['p99_ms'], '.1f')} ms  errors {r['errors']}", flush=True)
        saturation = max(r["images_per_s"] for r in loops)
        half = open_loop(url, reqs, saturation / 2, args.seconds, args.max_requests)
    finally:
        proc.terminate()
        proc.wait(60)

    lone_ms = lone["p50_ms"]
    checks = [
        {"target": "throughput at saturation >= 0.8x batch", "value": saturation / batch["images_per_s"],
         "goal": 0.8},
        {"target": "p99 at half of saturation <= 3x lone latency", "value": half["p99_ms"] / lone_ms,
         "goal": 3.0, "at_most": True},
    ]
    for ch in checks:
        ch["met"] = ch["value"] <= ch["goal"] if ch.get("at_most") else ch["value"] >= ch["goal"]

    print()
    print(f"{'load':<28}{'images/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    print(f"{'edge runner, batch':<28}{batch['images_per_s']:>10.1f}{'':>10}{'':>10}{batch['failed']:>8}")
    print(f"{'serve, lone request':<28}{lone['images_per_s']:>10.1f}{fmt(lone['p50_ms']):>10}"
          f"{fmt(lone['p99_ms']):>10}{lone['errors']:>8}")
    for r in loops:
        print(f"{'serve, ' + str(r['clients']) + ' clients':<28}{r['images_per_s']:>10.1f}{fmt(r['p50_ms']):>10}"
              f"{fmt(r['p99_ms']):>10}{r['errors']:>8}")
    print(f"{'serve, open loop %.1f/s' % half['rate']:<28}{half['images_per_s']:>10.1f}{fmt(half['p50_ms']):>10}"
          f"{fmt(half['p99_ms']):>10}{half['errors']:>8}")
    print()
    for ch in checks:
        print(f"{'met' if ch['met'] else 'MISSED':<7}{ch['target']}: {ch['value']:.2f} (goal {ch['goal']})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"n": len(paths), "settings": vars(args), "batch": batch, "lone": lone, "closed_loops": loops,
                  "saturation_images_per_s": saturation, "half_saturation": half, "checks": checks,
                  "machine": {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                              "load_before": os.getloadavg()}}
        (out / f"serve-n{len(paths)}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""beamzoo serve side by side with the servers users would pick instead: MLServer and Triton (PyTriton).

    python bench/serve_peers.py --setup        # the peers' venv: setup.py's "bench-serve" extra
    python bench/serve_peers.py --n 300 --seconds 10 --concurrency 1,8,32 --out bench/results/

The peers pin an older starlette and numpy than beamzoo serve, so they live in
a venv of their own (--peers-venv, default bench/cache/peers-venv) and run as
child processes. All three serve the zoo's EfficientNet-Lite0 ONNX file with
the same work per image (bench/peer_servers.py: decode + resize + crop +
scale from the JPEG's bytes, onnxruntime with one intra-op thread per
worker, softmax, top 5), the same batching (--max_batch, --max_delay_ms)
and --workers (beamzoo: worker threads; MLServer: parallel_workers; Triton:
model instances). Each gets the same request body: KServe v2 JSON, one
``BYTES`` input ``image`` of shape [1, 1] holding one base64 JPEG (the seeded
set of bench/images.py). In each of --rounds rounds all three start in fresh
processes on 127.0.0.1 free ports and are warmed up; then for each
--concurrency each in turn (the order rotated by round, so all see about the
same load) gets a closed loop of C clients (bench/serve.py's load
generator, in this process) for --seconds while the others idle. Prints
each one's best round per client count (req/s, p50, p99) and beamzoo's
ratio to the best peer; writes OUT/serve-peers-n{N}.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "efficientnet_lite0"
INFER = f"/v2/models/{MODEL}/infer"
CONTENDERS = ("beamzoo", "mlserver", "triton")
PEERS = ("mlserver", "triton")


def fail(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def setup(venv: Path) -> None:
    """The peers' venv, with the project's "bench-serve" extra (its core too: onnxruntime, OpenCV, Pillow)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([py, "-m", "pip", "install", f"{ROOT}[bench-serve]"], cwd=ROOT, check=True)


def v2_body(path: str) -> bytes:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [data]}]}).encode()


def label_of(answer) -> str | None:
    outs = {o.get("name"): o for o in answer.get("outputs", ())} if isinstance(answer, dict) else {}
    data = outs.get("label", {}).get("data")
    return data[0] if data else None


def send(client, body: bytes) -> bool:
    status, answer = client.request("POST", INFER, raw=body)
    return status == 200 and label_of(answer) is not None


def free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class StartFailed(RuntimeError):
    """A server did not come up."""


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    from beamzoo.serve.client import Client
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise StartFailed(f"it exited with {proc.returncode}: {tail(log)}")
        try:
            with Client(url, timeout=5) as c:
                if c.request("GET", f"/v2/models/{MODEL}/ready")[0] == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StartFailed(f"not ready after {seconds:.0f} s: {tail(log)}")


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop the child and what it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def beamzoo_server(args, tmp: Path, model: str, labels: str):
    import serve  # bench/serve.py
    proc, url = serve.start_server(args)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def mlserver(args, tmp: Path, model: str, labels: str):
    http, grpc, metrics = free_ports(3)
    repo = tmp / "mlserver"
    (repo / MODEL).mkdir(parents=True, exist_ok=True)
    (repo / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics,
        "parallel_workers": args.workers}))
    (repo / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "peer_servers.OnnxClassifier",
        "max_batch_size": args.max_batch, "max_batch_time": args.max_delay_ms / 1000,
        "parameters": {"version": "1", "extra": {"model": model, "labels": labels}}}))
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    log = tmp / "mlserver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(args.peers_venv / "bin" / "mlserver"), "start", str(repo)], cwd=repo, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop(proc, signal.SIGINT)


@contextmanager
def triton(args, tmp: Path, model: str, labels: str):
    ports = free_ports(3)
    log = tmp / "triton.log"
    cmd = [str(args.peers_venv / "bin" / "python"), str(HERE / "peer_servers.py"), "triton", model, labels,
           *map(str, ports), "--max_batch", str(args.max_batch), "--max_delay_ms", str(args.max_delay_ms),
           "--workers", str(args.workers)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop(proc, signal.SIGINT)


SERVERS = {"beamzoo": beamzoo_server, "mlserver": mlserver, "triton": triton}


def start(name: str, args, stack: ExitStack, tmp: Path, model: str, labels: str) -> tuple[str, dict]:
    """Start a contender (kept until ``stack`` closes) and warm it up: its URL and how that went. A start
    that fails is tried again, --start-tries times in all: under load, PyTriton's 1 s handshake with
    its model process can time out."""
    from beamzoo.serve.client import Client
    for attempt in range(1, args.start_tries + 1):
        t0 = time.perf_counter()
        try:
            url = stack.enter_context(SERVERS[name](args, tmp, model, labels))
        except StartFailed as exc:
            print(f"  {name}: did not start (try {attempt} of {args.start_tries}): {str(exc)[-600:]}", flush=True)
            failed = exc
            continue
        started = time.perf_counter() - t0
        with Client(url) as c:  # warm up; the labels show that all serve the same model alike
            warm = [label_of(c.request("POST", INFER, raw=body)[1]) for body in args.reqs[:args.warmup]]
        return url, {"start_s": started, "start_attempts": attempt, "warm_labels": warm, "loops": []}
    raise failed


def one_round(names: list[str], args, tmp: Path, model: str, labels: str, levels: list[int], index: int) -> dict:
    """Every contender up at once (idle but for its turn); at each client count each runs its closed
    loop in turn, the order rotated by round, so all see about the same load."""
    import serve
    runs = {}
    with ExitStack() as stack:
        urls = {}
        for name in names:
            try:
                urls[name], runs[name] = start(name, args, stack, tmp, model, labels)
            except StartFailed as exc:
                runs[name] = {"failed": str(exc)}
        order = [n for n in names[index % len(names):] + names[:index % len(names)] if n in urls]
        for clients in levels:
            for name in order:
                r = serve.closed_loop(urls[name], args.reqs, clients, args.seconds, args.max_requests, send=send)
                runs[name]["loops"].append(r)
                print(f"  {name:<9}{clients:>3} clients: {r['images_per_s']:7.1f} req/s  "
                      f"p50 {serve.fmt(r['p50_ms'], '.1f')} ms  p99 {serve.fmt(r['p99_ms'], '.1f')} ms  "
                      f"errors {r['errors']}  load {os.getloadavg()[0]:.1f}", flush=True)
    return runs


def peer_versions(venv: Path) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mlserver', 'nvidia-pytriton', 'onnxruntime', 'opencv-python-headless', 'numpy')}))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--setup", action="store_true", help="make the peers' venv (--peers-venv) and stop")
    p.add_argument("--peers-venv", type=Path, default=HERE / "cache" / "peers-venv",
                   help="the venv with setup.py's bench extra (default bench/cache/peers-venv)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="of beamzoo,mlserver,triton (default all)")
    p.add_argument("--n", type=int, default=300, help="images (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts (default 1,8,32)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each closed loop runs (default 10)")
    p.add_argument("--max-requests", type=int, default=20000, help="most requests in a loop (default 20000)")
    p.add_argument("--rounds", type=int, default=1, help="times every contender runs, round robin (default 1)")
    p.add_argument("--start-tries", type=int, default=3, help="starts of a server before giving up (default 3)")
    p.add_argument("--warmup", type=int, default=8, help="requests before the loops (default 8)")
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--max_delay_ms", type=float, default=5.0)
    p.add_argument("--max_queue", type=int, default=256, help="beamzoo's queue (the peers' are unbounded)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="workers of each server (default: cores)")
    p.add_argument("--out", default=None, help="folder for serve-peers-n{N}.json")
    args = p.parse_args(argv)
    args.peers_venv = args.peers_venv.resolve()
    if args.setup:
        setup(args.peers_venv)
        return 0
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        raise fail(f"--contenders: {', '.join(unknown) or 'none given'}: not one of {', '.join(CONTENDERS)}")
    if any(n in PEERS for n in names) and not (args.peers_venv / "bin" / "mlserver").exists():
        raise fail(f"no peers' venv at {args.peers_venv}: make it with `python bench/serve_peers.py --setup` "
                   "(or give --peers-venv, or --contenders beamzoo)")
    levels = [int(c) for c in args.concurrency.split(",")]

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from images import image_paths, make_set  # bench/images.py
    from serve import fmt
    from beamzoo import zoo
    card = zoo.get(MODEL)
    model = str(zoo.onnx_path(card))
    paths = image_paths(make_set(args.cache, args.n, args.seed))
    args.reqs = [v2_body(path) for path in paths]
    print(f"{len(paths)} images; {len(os.sched_getaffinity(0))} cores; {args.workers} workers; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    runs = {n: [] for n in names}
    result = {"n": len(paths), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                            if k != "reqs"},
              "load_before": os.getloadavg()}
    if any(n in PEERS for n in names):
        result["peer_versions"] = peer_versions(args.peers_venv)
    with tempfile.TemporaryDirectory(prefix="beamzoo-peers-") as tmp:
        labels = Path(tmp) / "labels.txt"
        labels.write_text("\n".join(card.labels) + "\n", encoding="utf-8")
        for index in range(args.rounds):
            for name, run in one_round(names, args, Path(tmp), model, str(labels), levels, index).items():
                runs[name].append(run)
    result["runs"] = runs

    # each contender's best round at each client count
    best = {n: {c: max((r["loops"][i] for r in rs if "loops" in r), key=lambda x: x["images_per_s"], default=None)
                for i, c in enumerate(levels)} for n, rs in runs.items()}
    warm = {n: next((r["warm_labels"] for r in rs if "warm_labels" in r), None) for n, rs in runs.items()}
    ref = warm.get("beamzoo")
    result["warm_labels_agree_with_beamzoo"] = {
        n: sum(a == b for a, b in zip(w, ref)) / len(ref) for n, w in warm.items() if w and ref and n != "beamzoo"}
    result["best"] = best
    print()
    print(f"{'clients':>7}  {'contender':<10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for c in levels:
        for n in names:
            r = best[n][c]
            if r is None:
                print(f"{c:>7}  {n:<10}{'did not run':>9}")
                continue
            print(f"{c:>7}  {n:<10}{fmt(r['images_per_s'], '9.1f')}{fmt(r['p50_ms'], '9.1f')}"
                  f"{fmt(r['p99_ms'], '9.1f')}{r['errors']:>8}")
        peers = [best[n][c] for n in names if n in PEERS and best[n][c]]
        if best.get("beamzoo", {}).get(c) and peers:
            top = max(peers, key=lambda x: x["images_per_s"])
            ratio = best["beamzoo"][c]["images_per_s"] / top["images_per_s"]
            result.setdefault("beamzoo_over_best_peer", {})[c] = ratio
            print(f"{'':>7}  beamzoo / best peer: {ratio:.2f} x req/s")
    for n, agree in result["warm_labels_agree_with_beamzoo"].items():
        print(f"{n}: top-1 of the warm-up requests equal to beamzoo's on {agree:.0%}")
    result["load_after"] = os.getloadavg()
    result["machine"] = {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"serve-peers-n{len(paths)}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

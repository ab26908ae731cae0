"""beamzoo serve under load, side by side with the edge runner's batch throughput.

    python bench/serve.py --n 300 --seconds 8 --out bench/results/

On the same seeded JPEGs (bench/images.py): (1) the edge runner scores them
in a fresh process (the batch throughput); (2) ``beamzoo serve`` starts in a
fresh process on 127.0.0.1 and a load generator in this process sends one
image per TF Serving ``:predict`` request: a lone request at a time (its
latency), then closed loops of C concurrent clients for each --concurrency
(throughput, p50, p99), then an open loop at half the saturation throughput
(arrivals on a fixed schedule; latency counted from when a request was due,
so a slow server cannot hide its queue); (3) fairness: small one-image
requests on a fixed schedule (--small-rate), first alone, then while
--big-clients clients send, back to back, requests of --big-rows images
that are cheap to send but expensive to decode (--big-side px square
PNGs of a few KB): the small requests' p50 and p99 under that load, against
alone; (4) wire: KServe v2 over HTTP, one image per request, JSON (base64)
against binary tensors (the binary data extension both ways, as tritonclient
sends by default): bytes on the wire per request and response (counted on
the client's sockets, over every image once), then requests/s at each
--wire-concurrency; (5) grpc: tritonclient's gRPC client against its HTTP
client (binary tensors both) on one fresh server process serving both, at
each --wire-concurrency. Every phase is bounded by --seconds and
--max-requests; --sections picks phases. Prints its tables; writes
OUT/serve-n{N}.json.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import importlib
import importlib.util
import json
import os
import platform
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from images import image_paths, make_set  # noqa: E402

from beamzoo.serve.client import Client  # noqa: E402

MODEL = "efficientnet_lite0"
SECTIONS = ("batch", "lone", "closed", "open", "fair", "wire", "grpc")


def batch_child(files: str, out: str, workers: int | None) -> None:
    """The edge runner on the images (run in a fresh process): prints its result as JSON."""
    from beamzoo.pipeline import run, score_images
    from beamzoo.runners.edge import EdgeRunner
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


def closed_loop(url: str, reqs: list, clients: int, seconds: float, limit: int, send=send, client=Client) -> dict:
    """``clients`` threads, each sending its next request when the last is answered; ``send(client, body)``
    says whether the answer was right; ``client(url)``: each thread's client (a context manager)."""
    lat, errors, lock = [], [0], threading.Lock()
    count = iter(range(1 << 62))
    stop = time.perf_counter() + seconds

    def loop():
        with client(url) as c:
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


def expensive_png(side: int) -> bytes:
    """A ``side`` px square PNG of a few stripes: a few KB to send, side**2 pixels to decode."""
    img = np.full((side, side, 3), (40, 120, 200), np.uint8)
    img[::7, :, 0] = 90
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("could not encode the PNG")
    return buf.tobytes()


def big_load(url: str, body: bytes, clients: int, stop: threading.Event) -> tuple[list[threading.Thread], dict]:
    """``clients`` threads sending ``body`` back to back until ``stop``; what they got, counted."""
    got = {"answered": 0, "errors": 0, "seconds": []}
    lock = threading.Lock()

    def loop():
        with Client(url, timeout=300) as c:
            while not stop.is_set():
                t = time.perf_counter()
                status, _ = c.request("POST", PATH, raw=body)
                with lock:
                    if status == 200:
                        got["answered"] += 1
                        got["seconds"].append(time.perf_counter() - t)
                    else:
                        got["errors"] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads, got


def fairness(url: str, reqs: list[bytes], args) -> dict:
    """Small requests on a schedule, alone and while big expensive ones keep coming."""
    png = expensive_png(args.big_side)
    big = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}] * args.big_rows}).encode()
    alone = open_loop(url, reqs, args.small_rate, args.seconds, args.max_requests, senders=8)
    stop = threading.Event()
    threads, got = big_load(url, big, args.big_clients, stop)
    time.sleep(min(2.0, args.seconds / 4))  # the big requests' rows fill the queue first
    under = open_loop(url, reqs, args.small_rate, args.seconds, args.max_requests, senders=8)
    stop.set()
    for t in threads:
        t.join(300)
    secs = got.pop("seconds")
    return {"big_rows": args.big_rows, "big_clients": args.big_clients, "big_side": args.big_side,
            "big_png_bytes": len(png), "big_body_bytes": len(big), "small_alone": alone, "small_under_big": under,
            "big": {**got, "p50_ms": 1000 * quantile(secs, 0.5) if secs else None}}


# --- KServe v2 over HTTP: binary tensors against JSON (bytes on the wire, requests/s) ---

V2_PATH = f"/v2/models/{MODEL}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def v2_json(image: bytes) -> tuple[bytes, dict]:
    """One image as KServe v2 JSON: base64 data in, every output as JSON data out."""
    req = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]}
    return json.dumps(req).encode(), {"Content-Type": "application/json"}


def v2_binary(image: bytes) -> tuple[bytes, dict]:
    """One image as tritonclient's HTTP client sends it by default: the binary data extension both ways."""
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4 + len(image)}}],
                       "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    return head + struct.pack("<I", len(image)) + image, {HEADER_LENGTH: str(len(head)),
                                                           "Content-Type": "application/octet-stream"}


class CountingSocket(socket.socket):
    """A TCP socket that counts what it sends and receives: HTTP heads and bodies, not TCP/IP headers."""

    sent = received = 0

    def sendall(self, data, *flags):
        self.sent += len(data)
        return super().sendall(data, *flags)

    def send(self, data, *flags):
        n = super().send(data, *flags)
        self.sent += n
        return n

    def recv_into(self, buffer, *args):
        n = super().recv_into(buffer, *args)
        self.received += n
        return n

    def recv(self, *args):
        data = super().recv(*args)
        self.received += len(data)
        return data


class WireClient:
    """One keep-alive HTTP/1.1 connection (http.client, as ``Client``) whose bytes on the wire are counted."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urlsplit(url)
        self._conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        self._conn._create_connection = self._connect
        self._socks = []

    def _connect(self, address, timeout=None, source_address=None):
        sock = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        self._socks.append(sock)
        return sock

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
        self._conn.request("POST", path, body, headers)
        r = self._conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    @property
    def bytes(self) -> tuple[int, int]:
        """(sent, received) over every connection it made."""
        return sum(s.sent for s in self._socks), sum(s.received for s in self._socks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._conn.close()


def v2_label(headers: dict, data: bytes) -> str | None:
    """The one image's label of a KServe v2 answer, JSON or binary; None if it has none."""
    n = int(headers.get(HEADER_LENGTH.lower(), len(data)))
    answer, at = json.loads(data[:n]), n
    for o in answer.get("outputs", []):
        size = o.get("parameters", {}).get("binary_data_size")
        if o["name"] == "label":
            if size is None:
                return o["data"][0]
            (k,) = struct.unpack_from("<I", data, at)
            return data[at + 4:at + 4 + k].decode() or None
        at += size or 0
    return None


def send_v2(client: WireClient, req: tuple[bytes, dict]) -> bool:
    status, headers, data = client.post(V2_PATH, *req)
    return status == 200 and bool(v2_label(headers, data))


FORMS = {"json": v2_json, "binary": v2_binary}


def wire(url: str, images: list[bytes], levels: list[int], args) -> dict:
    """Bytes on the wire per request over every image once, then requests/s at each client count."""
    reqs = {form: [make(i) for i in images] for form, make in FORMS.items()}
    out = {"bytes": {}, "loops": {form: [] for form in FORMS}, "labels_agree": None}
    labels = {}
    for form, bodies_ in reqs.items():
        with WireClient(url) as c:
            got = []
            for req in bodies_[:args.max_requests]:
                status, headers, data = c.post(V2_PATH, *req)
                got.append(v2_label(headers, data) if status == 200 else None)
            sent, received = c.bytes
        labels[form] = got
        out["bytes"][form] = {"requests": len(got), "request": sent / len(got), "response": received / len(got),
                              "total": (sent + received) / len(got)}
    out["labels_agree"] = sum(a == b and a is not None for a, b in zip(*labels.values())) / len(labels["json"])
    for k, clients in enumerate(levels):
        for form in (("json", "binary") if k % 2 == 0 else ("binary", "json")):  # neither always goes first
            r = closed_loop(url, reqs[form], clients, args.seconds, args.max_requests, send=send_v2,
                            client=WireClient)
            out["loops"][form].append(r)
    return out


# --- gRPC against HTTP: tritonclient's two clients, binary tensors, against one server process ---

def grpc_missing() -> str | None:
    """Why gRPC cannot be measured here, or None."""
    if importlib.util.find_spec("beamzoo.serve.grpc_service") is None:
        return "beamzoo.serve.grpc_service missing"
    for module in ("tritonclient.grpc", "tritonclient.http"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} missing ({exc}): pip install 'tritonclient[http,grpc]'"
    return None


def grpc_child(settings: str) -> None:
    """A server on HTTP and gRPC (run in a fresh process): prints both addresses, serves until stdin closes."""
    from beamzoo.serve.grpc_service import start_grpc
    from beamzoo.serve.models import Servable
    from beamzoo.serve.server import Server
    knobs = {k: v for k, v in json.loads(settings).items() if v is not None}
    running = Server([Servable.from_model(MODEL, knobs["max_batch"])], **knobs).start()
    handle = start_grpc(running.server)
    print(json.dumps({"http": running.url, "grpc": handle.url}), flush=True)
    sys.stdin.read()
    handle.stop(5)
    running.stop()


def triton_contender(kind: str, images: list[bytes]):
    """(client factory, requests, send) of tritonclient's ``kind`` ("http" or "grpc") client, default settings."""
    module = importlib.import_module(f"tritonclient.{kind}")
    from tritonclient.utils import InferenceServerException

    def request(image):
        i = module.InferInput("image", [1], "BYTES")
        i.set_data_from_numpy(np.array([image], dtype=object))
        return i

    def client(url):
        return module.InferenceServerClient(url.removeprefix("http://"))

    def send_one(c, inp) -> bool:
        try:
            return bool(c.infer(MODEL, [inp]).as_numpy("label")[0])
        except InferenceServerException:
            return False

    return client, [request(i) for i in images], send_one


def grpc_against_http(images: list[bytes], levels: list[int], args) -> dict:
    settings = json.dumps({k: getattr(args, k) for k in ("max_batch", "max_delay_ms", "max_queue", "workers")})
    proc = subprocess.Popen([sys.executable, __file__, "--grpc-child", settings], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the HTTP and gRPC server did not start (exit {proc.wait(60)})")
        urls = json.loads(line)
        contenders = {kind: triton_contender(kind, images) for kind in ("http", "grpc")}
        out = {kind: [] for kind in contenders}
        for kind, (client, reqs, send_one) in contenders.items():
            with client(urls[kind]) as c:
                for r in reqs[:8]:  # warm up
                    send_one(c, r)
        for k, clients in enumerate(levels):
            for kind in (("http", "grpc") if k % 2 == 0 else ("grpc", "http")):
                client, reqs, send_one = contenders[kind]
                out[kind].append(closed_loop(urls[kind], reqs, clients, args.seconds, args.max_requests,
                                             send=send_one, client=client))
        return out
    finally:
        proc.stdin.close()
        proc.wait(60)


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
    if isinstance(v, (int, float)):
        return format(v, spec)
    width = spec.split(".")[0]
    return format("n/a", f">{width}") if width else "n/a"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def print_wire(w: dict) -> None:
    b, j = w["bytes"]["binary"], w["bytes"]["json"]
    print(f"\nKServe v2 over HTTP, one image per request, {j['requests']} images each way "
          f"(top-1 labels agree: {w['labels_agree']:.0%}):")
    print("  bytes per request   request  response    total")
    for form, x in (("JSON", j), ("binary", b)):
        print(f"  {form:<16}{x['request']:>10.0f}{x['response']:>10.0f}{x['total']:>9.0f}")
    print(f"  binary / JSON   {b['request'] / j['request']:>10.3f}{b['response'] / j['response']:>10.3f}"
          f"{b['total'] / j['total']:>9.3f}")
    print(f"  {'clients':>7}{'JSON req/s':>12}{'binary req/s':>14}{'binary/JSON':>13}{'p50 ms (J / b)':>18}")
    for rj, rb in zip(w["loops"]["json"], w["loops"]["binary"]):
        print(f"  {rj['clients']:>7}{rj['images_per_s']:>12.1f}{rb['images_per_s']:>14.1f}"
              f"{fmt(ratio(rb['images_per_s'], rj['images_per_s']), '13.2f')}"
              f"{fmt(rj['p50_ms'], '11.1f')} /{fmt(rb['p50_ms'], '5.1f')}  errors {rj['errors'] + rb['errors']}")


def print_grpc(g: dict) -> None:
    print("\ngRPC against HTTP (tritonclient.grpc / tritonclient.http, binary tensors, one image per request):")
    print(f"  {'clients':>7}{'HTTP req/s':>12}{'gRPC req/s':>12}{'gRPC/HTTP':>11}{'p50 ms (H / g)':>18}"
          f"{'p99 ms (H / g)':>18}")
    for rh, rg in zip(g["http"], g["grpc"]):
        print(f"  {rh['clients']:>7}{rh['images_per_s']:>12.1f}{rg['images_per_s']:>12.1f}"
              f"{fmt(ratio(rg['images_per_s'], rh['images_per_s']), '11.2f')}"
              f"{fmt(rh['p50_ms'], '11.1f')} /{fmt(rg['p50_ms'], '5.1f')}"
              f"{fmt(rh['p99_ms'], '11.1f')} /{fmt(rg['p99_ms'], '5.1f')}  errors {rh['errors'] + rg['errors']}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--batch-child"]:
        batch_child(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else None)
        return 0
    if argv[:1] == ["--grpc-child"]:
        grpc_child(argv[1])
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
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"phases to run, of {','.join(SECTIONS)} (default all; open needs closed)")
    p.add_argument("--wire-concurrency", default="1,8,32",
                   help="client counts of wire (binary against JSON) and grpc (default 1,8,32)")
    p.add_argument("--small-rate", type=float, default=4.0, help="small requests per second in fair (default 4)")
    p.add_argument("--big-rows", type=int, default=64, help="images per big request in fair (default 64)")
    p.add_argument("--big-clients", type=int, default=2, help="clients sending big requests in fair (default 2)")
    p.add_argument("--big-side", type=int, default=2000, help="side of a big request's PNGs in px (default 2000)")
    p.add_argument("--out", default=None, help="folder for serve-n{N}.json")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    wire_levels = [int(c) for c in args.wire_concurrency.split(",")]
    if unknown or ("open" in sections and "closed" not in sections):
        p.error(f"--sections: {', '.join(sorted(unknown)) or 'open'}: not a phase (or open without closed)")

    files = make_set(args.cache, args.n, args.seed)
    paths = image_paths(files)
    reqs = bodies(paths)
    print(f"{len(paths)} images; {len(os.sched_getaffinity(0))} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    result = {"n": len(paths), "settings": vars(args)}
    batch = lone = half = fair = wired = grpc = None
    loops = []
    if "batch" in sections:
        batch = result["batch"] = batch_throughput(str(files), len(paths), args.workers)
        print(f"edge runner (batch): {batch['images_per_s']:.1f} images/s", flush=True)

    proc, url = start_server(args) if sections - {"batch", "grpc"} else (None, None)
    try:
        with Client(url) as c:
            for body in reqs[:8] if proc else ():  # warm up
                send(c, body)
        if "lone" in sections:
            lone = result["lone"] = closed_loop(url, reqs, 1, args.seconds, args.lone)
            print(f"lone request: p50 {lone['p50_ms']:.1f} ms", flush=True)
        for clients in levels if "closed" in sections else ():
            loops.append(closed_loop(url, reqs, clients, args.seconds, args.max_requests))
            r = loops[-1]
            print(f"  {clients:>3} clients: {r['images_per_s']:.1f} images/s  p50 {fmt(r['p50_ms'], '.1f')} ms  "
                  f"p99 {fmt(r['p99_ms'], '.1f')} ms  errors {r['errors']}", flush=True)
        if loops:
            result["closed_loops"] = loops
            saturation = result["saturation_images_per_s"] = max(r["images_per_s"] for r in loops)
        if "open" in sections:
            half = result["half_saturation"] = open_loop(url, reqs, saturation / 2, args.seconds, args.max_requests)
        if "fair" in sections:
            fair = result["fairness"] = fairness(url, reqs, args)
        if "wire" in sections:
            wired = result["wire"] = wire(url, [Path(p).read_bytes() for p in paths], wire_levels, args)
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    if "grpc" in sections:
        why = grpc_missing()
        if why:
            result["grpc"] = {"not_measured": why}
            print(f"gRPC: not measured ({why})", flush=True)
        else:
            grpc = result["grpc"] = grpc_against_http([Path(p).read_bytes() for p in paths], wire_levels, args)

    checks = []
    if batch and loops:
        checks.append({"target": "throughput at saturation >= 0.8x batch",
                       "value": saturation / batch["images_per_s"], "goal": 0.8})
    if lone and half:
        checks.append({"target": "p99 at half of saturation <= 3x lone latency",
                       "value": half["p99_ms"] / lone["p50_ms"], "goal": 3.0, "at_most": True})
    if fair and fair["small_under_big"]["p99_ms"] and fair["big"]["p50_ms"]:  # not all of a big one's work
        checks.append({"target": "p99 of small requests among big ones <= 0.5x a big one's p50",
                       "value": fair["small_under_big"]["p99_ms"] / fair["big"]["p50_ms"], "goal": 0.5,
                       "at_most": True})
    for ch in checks:
        ch["met"] = ch["value"] <= ch["goal"] if ch.get("at_most") else ch["value"] >= ch["goal"]
    result["checks"] = checks

    def line(name, r, errors=None):
        print(f"{name:<34}{fmt(r['images_per_s'], '10.1f')}{fmt(r['p50_ms'], '10.1f')}{fmt(r['p99_ms'], '10.1f')}"
              f"{r['errors'] if errors is None else errors:>8}")

    print()
    if batch or lone or loops or half or fair:
        print(f"{'load':<34}{'images/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    if batch:
        line("edge runner, batch", {**batch, "p50_ms": None, "p99_ms": None}, batch["failed"])
    if lone:
        line("serve, lone request", lone)
    for r in loops:
        line(f"serve, {r['clients']} clients", r)
    if half:
        line(f"serve, open loop {half['rate']:.1f}/s", half)
    if fair:
        line(f"small {args.small_rate:g}/s, alone", fair["small_alone"])
        line(f"small {args.small_rate:g}/s, among big", fair["small_under_big"])
        b = fair["big"]
        print(f"  big requests ({args.big_rows} x {args.big_side}px PNG, {fair['big_body_bytes'] // 1024} KB, "
              f"{args.big_clients} clients): {b['answered']} answered, p50 {fmt(b['p50_ms'], '.0f')} ms, "
              f"{b['errors']} errors")
    if wired:
        print_wire(wired)
    if grpc:
        print_grpc(grpc)
    print()
    for ch in checks:
        print(f"{'met' if ch['met'] else 'MISSED':<7}{ch['target']}: {ch['value']:.2f} (goal {ch['goal']})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["machine"] = {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                             "load_before": os.getloadavg()}
        (out / f"serve-n{len(paths)}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

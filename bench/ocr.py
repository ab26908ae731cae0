"""OCR benchmark: RapidOCR's own engine and beamzoo's OCR pipeline on the same images, in one run.

    python bench/ocr.py --n 100 --repeat 2 --out bench/results/

Renders N pages of known text (tests/ocr_support.py: 1-4 lines, five fonts,
four backgrounds, small rotations) into bench/cache/ (git-ignored; reused),
then runs each contender in a fresh child process, round-robin ``--repeat``
times: RapidOCR 1.4.4 (its Python engine from the pinned wheel, default
settings, one image after another from the file path) and beamzoo's
``ocr_images`` graph on the EdgeRunner (``--direct`` adds DirectRunner). It
prints images/s (best run), CPU seconds per image, the ratio to RapidOCR, the
character error rate against the text drawn, with spaces and without (each
contender's lines put in reading order the same way, a row a line), and how many
images got the same lines as RapidOCR (spaces aside); writes OUT/ocr-n{N}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's beamzoo, and the page renderer
VERSION = 1  # of the image recipe


def images(cache: Path, n: int, seed: int) -> Path:
    import cv2
    from ocr_support import render
    d = cache / f"ocr-n{n}-seed{seed}-v{VERSION}"
    if len(list(d.glob("*.png"))) == n:
        return d
    tmp = Path(tempfile.mkdtemp(dir=cache))
    truth = {}
    for i in range(n):
        img, lines = render(seed * 100_000 + i)
        cv2.imwrite(str(tmp / f"page{i:05d}.png"), img)
        truth[f"page{i:05d}.png"] = lines
    (tmp / "truth.json").write_text(json.dumps(truth, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d


# ---- child side --------------------------------------------------------------

def run_rapidocr(paths: list[str]) -> dict:
    from ocr_support import rapidocr_engine
    start = time.perf_counter()
    engine = rapidocr_engine()
    lines, texts = {}, {}
    for p in paths:
        result, _ = engine(p)
        name = os.path.basename(p)
        lines[name] = [r[1] for r in result or ()]
        texts[name] = page_text(lines[name], [r[0] for r in result or ()])
    return {"seconds": time.perf_counter() - start, "lines": lines, "text": texts}


def page_text(texts: list[str], boxes: list) -> str:
    """Lines as beamzoo's TextLines puts them: rows in reading order, a row's regions joined by a space."""
    from beamzoo.transforms.ocr.lines import reading_order
    return "\n".join(" ".join(texts[i] for i in row) for row in reading_order(boxes))


def run_beamzoo(paths: list[str], runner: str) -> dict:
    import pyarrow.parquet as pq
    from beamzoo.pipeline import run
    from beamzoo.runners.edge import EdgeRunner
    from beamzoo.ocr import ocr_images
    out = tempfile.mkdtemp(prefix="bench-ocr-")
    try:
        start = time.perf_counter()
        run(ocr_images(os.path.join(os.path.dirname(paths[0]), "*.png"), out), runner,
            edge=EdgeRunner(progress=False), progress=False)
        seconds = time.perf_counter() - start
        table = pq.read_table(os.path.join(out, "predictions")).to_pylist()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "lines": {os.path.basename(r["path"]): [x["text"] for x in r["lines"]]
                                          for r in table},
            "text": {os.path.basename(r["path"]): r["text"] for r in table}}


def child(name: str, directory: str, result: str) -> int:
    paths = sorted(str(p) for p in Path(directory).glob("*.png"))
    cpu = time.process_time()
    res = run_rapidocr(paths) if name == "rapidocr" else run_beamzoo(
        paths, {"edge": "EdgeRunner", "direct": "DirectRunner"}[name])
    res["cpu_seconds"] = time.process_time() - cpu
    Path(result).write_text(json.dumps(res))
    return 0


# ---- parent side -------------------------------------------------------------

TITLES = {"rapidocr": "RapidOCR 1.4.4 engine", "edge": "beamzoo ocr_images, EdgeRunner",
          "direct": "beamzoo ocr_images, DirectRunner"}


def spawn(name: str, directory: Path, log_dir: Path) -> dict:
    result = log_dir / f"{name}.json"
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, __file__, "--child", name, str(directory), str(result)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    res = json.loads(result.read_text())
    res["load_before"] = load
    return res


def same(a: list[str], b: list[str]) -> int:
    """How many lines of ``a`` are lines of ``b`` (each matched once), spaces aside."""
    left, n = [spaceless(t) for t in b], 0
    for t in map(spaceless, a):
        if t in left:
            left.remove(t)
            n += 1
    return n


def error_rates(texts: dict[str, str], truth: dict[str, list[str]]) -> tuple[float, float]:
    """The mean character error rate of the pages read against the text drawn: with spaces, without."""
    from ocr_support import cer

    def rate(norm) -> float:
        return sum(cer([norm(t) for t in texts.get(k, "").split("\n")], [norm(t) for t in v])
                   for k, v in truth.items()) / len(truth)
    return rate(lambda t: t), rate(spaceless)


def spaceless(text: str) -> str:
    return text.replace(" ", "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--direct", action="store_true", help="also beamzoo on DirectRunner")
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    directory = images(cache, args.n, args.seed)
    names = ["rapidocr", "edge"] + (["direct"] if args.direct else [])
    runs = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as logs:
        for r in range(args.repeat):
            for name in names:
                res = spawn(name, directory, Path(logs))
                runs[name].append(res)
                print(f"run {r + 1} {name}: {args.n / res['seconds']:.2f} images/s "
                      f"(load average before {res['load_before']:.1f})", flush=True)
    best = {n: min(rs, key=lambda x: x["seconds"]) for n, rs in runs.items()}
    ref = best["rapidocr"]
    truth = json.loads((directory / "truth.json").read_text())
    table = []
    for name in names:
        b = best[name]
        lines = b["lines"]
        alike = sum(same(lines.get(k, []), v) for k, v in ref["lines"].items())
        compared = sum(max(len(lines.get(k, [])), len(v)) for k, v in ref["lines"].items())
        same_images = sum(sorted(map(spaceless, lines.get(k, []))) == sorted(map(spaceless, v))
                          for k, v in ref["lines"].items())
        with_spaces, without_spaces = error_rates(b["text"], truth)
        table.append({"contender": name, "title": TITLES[name], "images_per_s": args.n / b["seconds"],
                      "cpu_s_per_image": b["cpu_seconds"] / args.n,
                      "ratio": ref["seconds"] / b["seconds"], "images_same_text": same_images / args.n,
                      "lines_alike": alike, "lines_compared": compared,
                      "cer": with_spaces, "cer_without_spaces": without_spaces,
                      "all_runs_images_per_s": [args.n / x["seconds"] for x in runs[name]]})
    cpu = platform.processor() or platform.machine()
    print(f"\n{args.n} rendered pages, {len(os.sched_getaffinity(0))} cores ({cpu}), best of {args.repeat}\n")
    print("CER: against the text drawn; same text, lines alike: as RapidOCR's, spaces aside\n")
    print("| contender | images/s | CPU s/image | × RapidOCR | CER | CER without spaces | same text (images) "
          "| lines alike |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['title']} | {t['images_per_s']:.2f} | {t['cpu_s_per_image']:.3f} | {t['ratio']:.2f} | "
              f"{t['cer']:.2%} | {t['cer_without_spaces']:.2%} | {t['images_same_text']:.1%} | "
              f"{t['lines_alike']} / {t['lines_compared']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    (out / f"ocr-n{args.n}.json").write_text(json.dumps(
        {"n": args.n, "seed": args.seed, "repeat": args.repeat, "cores": len(os.sched_getaffinity(0)),
         "machine": platform.platform(), "onnxruntime": onnxruntime.__version__, "table": table,
         "load_average_end": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

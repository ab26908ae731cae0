"""What reduced-size JPEG decoding changes, and the speed it buys: every image scored twice.

    python bench/fidelity.py                                   # the sample photographs
    python bench/fidelity.py --input 'photos/*.jpg' --upscale 2,4 --out bench/results/

beamzoo decodes a JPEG whose short side is at least twice the model's resize side at
1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, never below the resize): the knob
``reduced_decode``, on by default (``--no_reduced_decode`` on score_images.py turns
it off). This runs score_images' graph on the edge runner with the same model, once
with it on and once with it off, and reports for each set of images: how many were
decoded at reduced size, top-1 agreement, the images whose top-1 changed (and whether
the full decode's label is in the reduced run's top 5), the mean |difference| of the
top-1 score, and the images/s with it on over off.

The sets: the input files as they are; with ``--as_jpeg``, those that are not JPEGs
re-encoded as JPEG (quality 95) at their own size; with ``--upscale F,...``, every
input enlarged F times (bicubic) and written as JPEG (quality 95). Upscaled images are
not large photographs: an enlarged image holds no detail finer than its source (its
fine structure is the interpolation's), so their agreement does not stand for real large
photographs; their images/s say what the reduced decode saves on files that big.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import cpu_model, versions  # noqa: E402

SHOWN = 10  # changed answers printed for a set


def link_set(files: list[str], folder: Path) -> list[Path]:
    """The files as links in ``folder`` (numbered, so that equal names in two folders stay apart)."""
    folder.mkdir(parents=True)
    out = []
    for i, f in enumerate(files):
        out.append(folder / f"{i:05d}_{os.path.basename(f)}")
        out[-1].symlink_to(os.path.abspath(f))
    return out


def jpeg_set(files: list[str], folder: Path, scale: float = 1.0) -> list[Path]:
    """The files decoded, enlarged ``scale`` times (bicubic) and written as JPEG (quality 95)."""
    folder.mkdir(parents=True)
    out = []
    for i, f in enumerate(files):
        img = cv2.imread(f, cv2.IMREAD_COLOR)
        if img is None:
            continue
        if scale != 1:
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        path = folder / f"{i:05d}_{Path(f).stem}.jpg"
        path.write_bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
        out.append(path)
    return out


def reduced_at(path: Path, resize: int) -> bool:
    """Whether beamzoo decodes this file at reduced size: a JPEG with a short side >= 2 x resize."""
    from beamzoo.imaging import read_header
    try:
        fmt, w, h = read_header(path.read_bytes())
    except ValueError:
        return False
    return fmt == "JPEG" and min(w, h) >= 2 * resize


def scored(folder: Path, out: str, card, reduced: bool) -> tuple[dict, dict]:
    """(rows by path, timing) of one run of score_images' graph on the edge runner."""
    import pyarrow.dataset as ds

    from beamzoo.pipeline import run, score_images
    from beamzoo.runners.edge import EdgeRunner
    graph = score_images(str(folder / "*"), out, card, reduced_decode=reduced, topk=5, derived_only=True)
    stats = run(graph, "EdgeRunner", edge=EdgeRunner(progress=False), progress=False)
    decode = sum(m.wall_s for k, m in stats.steps.items() if "decode" in k)
    rows = ds.dataset(os.path.join(out, "predictions"), format="parquet").to_table().to_pylist()
    return {r["path"]: r for r in rows}, {"images_per_s": stats.inputs / stats.seconds,
                                          "decode_ms": 1000 * decode / max(stats.inputs, 1)}


def measure(name: str, paths: list[Path], card, resize: int, tmp: Path, repeat: int) -> dict:
    """Both runs on one set, ``repeat`` rounds (the order alternating); the answers of the first round,
    the best timing of each."""
    folder = paths[0].parent
    answers, times = {}, {True: [], False: []}
    for r in range(repeat):
        for reduced in ((True, False) if r % 2 == 0 else (False, True)):
            got, timing = scored(folder, str(tmp / f"{folder.name}-{r}-{int(reduced)}"), card, reduced)
            answers.setdefault(reduced, got)
            times[reduced].append(timing)
    fast, full = answers[True], answers[False]
    small = {str(p) for p in paths if reduced_at(p, resize)}
    both = sorted(set(fast) & set(full))
    changed = [p for p in both if fast[p]["label"] != full[p]["label"]]
    diff = {p: abs(fast[p]["score"] - full[p]["score"]) for p in both}
    on_small = [diff[p] for p in both if p in small]
    best = {k: {"images_per_s": max(t["images_per_s"] for t in v), "decode_ms": min(t["decode_ms"] for t in v)}
            for k, v in times.items()}
    return {"set": name, "images": len(paths), "reduced": len(small), "compared": len(both),
            "dead_letters": 2 * len(paths) - len(fast) - len(full),
            "agreement": sum(fast[p]["label"] == full[p]["label"] for p in both) / max(len(both), 1),
            "changed": len(changed), "changed_in_top5": sum(full[p]["label"] in fast[p]["topk_labels"] for p in changed),
            "changes": [{"path": os.path.basename(p), "full": full[p]["label"], "reduced": fast[p]["label"]}
                        for p in changed],
            "mean_abs_score_diff_reduced": sum(on_small) / len(on_small) if on_small else 0.0,
            "max_abs_score_diff_reduced": max(on_small, default=0.0),
            "max_abs_score_diff_rest": max((diff[p] for p in both if p not in small), default=0.0),
            "reduced_run": best[True], "full_run": best[False], "repeat": repeat,
            "speedup": best[True]["images_per_s"] / best[False]["images_per_s"],
            "decode_ratio": best[True]["decode_ms"] / max(best[False]["decode_ms"], 1e-9)}


def show(r: dict, resize: int) -> None:
    print(f"{r['set']}")
    print(f"  images: {r['images']}, decoded at reduced size: {r['reduced']} (JPEGs with a short side "
          f">= {2 * resize}); dead letters (both runs): {r['dead_letters']}")
    print(f"  top-1 agreement: {r['agreement']:.1%} ({r['compared'] - r['changed']} of {r['compared']}); "
          f"top-1 changed: {r['changed']}, the full decode's label in the reduced run's top-5 for "
          f"{r['changed_in_top5']} of them")
    for c in r["changes"][:SHOWN]:
        print(f"    {c['path']}: {c['full']!r} full, {c['reduced']!r} reduced")
    if len(r["changes"]) > SHOWN:
        print(f"    ... and {len(r['changes']) - SHOWN} more (all in --out's fidelity.json)")
    print(f"  mean |top-1 score difference|: {r['mean_abs_score_diff_reduced']:.4f} on the {r['reduced']} decoded "
          f"at reduced size (largest {r['max_abs_score_diff_reduced']:.4f}); largest on the others "
          f"{r['max_abs_score_diff_rest']:.4f}")
    fast, full = r["reduced_run"], r["full_run"]
    print(f"  images/s: {fast['images_per_s']:.1f} reduced, {full['images_per_s']:.1f} full: {r['speedup']:.2f} x; "
          f"decode+resize ms/image: {fast['decode_ms']:.1f} reduced, {full['decode_ms']:.1f} full: "
          f"{r['decode_ratio']:.2f} x (best of {r['repeat']} run{'s' if r['repeat'] > 1 else ''} each)")


def factors(text: str) -> list[float]:
    """``--upscale 2,4``: the factors, each over 1."""
    try:
        out = [float(x) for x in text.split(",") if x]
    except ValueError:
        out = []
    if not out or min(out) <= 1:
        raise argparse.ArgumentTypeError(f"give factors over 1, e.g. 2,4 (got {text!r})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="glob of image files or a directory (default: the sample photographs)")
    p.add_argument("--n", type=int, default=None, help="only the first N input files")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--as_jpeg", action="store_true",
                   help="also a set of the inputs that are not JPEGs, re-encoded as JPEG at their own size")
    p.add_argument("--upscale", type=factors, default=[], metavar="F,...",
                   help="also a set of the inputs enlarged F times, as JPEG, for each F (labelled upscaled)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of both runs; the best timing counts")
    p.add_argument("--out", help="folder to write fidelity.json to")
    args = p.parse_args(argv)

    from beamzoo import zoo
    from beamzoo.imaging import EXTENSIONS
    from beamzoo.samples import sample_files
    from beamzoo.transforms.io import list_files
    from beamzoo.transforms.preprocess import ResizeCrop
    card = zoo.get(args.model)
    resize = ResizeCrop.for_input(card.input, resize=card.resize).resize
    files = list_files(args.input) if args.input else [str(f) for f in sample_files()]
    files = [f for f in files if f.lower().endswith(EXTENSIONS)][:args.n]
    if not files:
        print(f"error: no image files in {args.input!r}", file=sys.stderr)
        return 2
    what = "the input files as they are" if args.input else "the sample photographs as they ship (real photographs)"
    tmp = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    try:
        rows = measure_all(args, files, what, card, resize, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = Path(args.out) / "fidelity.json"
        path.write_text(json.dumps({"model": card.ref, "resize": resize, "sets": rows, "cpu": cpu_model(),
                                    "versions": versions()}, indent=1))
        print(f"written to {path}")
    return 0


def measure_all(args, files: list[str], what: str, card, resize: int, tmp: Path) -> list[dict]:
    """Every set made, measured and shown."""
    sets = [(what, link_set(files, tmp / "input"))]
    if args.as_jpeg:
        others = [f for f in files if not f.lower().endswith((".jpg", ".jpeg"))]
        if others:
            sets.append(("the inputs that are not JPEGs, re-encoded as JPEG (quality 95) at their own size",
                         jpeg_set(others, tmp / "as_jpeg")))
    for f in args.upscale:
        sets.append((f"UPSCALED x{f:g} (bicubic, JPEG quality 95): not large real photographs",
                     jpeg_set(files, tmp / f"x{f:g}", f)))
    for reduced in (True, False):  # the model and the decode workers start here, before any timed run
        scored(sets[0][1][0].parent, str(tmp / f"warm-{int(reduced)}"), card, reduced)

    print(f"{card.ref}, resize {resize}: score_images' graph on the EdgeRunner, reduced_decode on and off; "
          f"{len(os.sched_getaffinity(0))} cores ({cpu_model()}), load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, paths in sets:
        rows.append(measure(name, paths, card, resize, tmp, args.repeat))
        show(rows[-1], resize)
    return rows


if __name__ == "__main__":
    sys.exit(main())

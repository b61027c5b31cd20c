"""Benchmark feature extraction against the backbones' pure forward speed (issue 3).

In one run, on the same backbones, batch size, image size and precision, it measures:

(a) forward: images/s of the backbones alone on in-memory uint8 batches of the benchmark's own
    JPEGs, decoded and resized before the clock (in each of --views, default original + flipped)
    through the same traced functions `extract` uses (views, preprocess_input, model), after a
    warm-up batch. The photos, not random pixels: with random weights the pass's speed depends
    on the pixel values (with the middle layer, uniform noise ran about 15% faster than photos);
    measured before and after the extractions and averaged, since the CPU may be shared;
(b) extract: images/s of `extract` on N and on 10N JPEGs of about 500x375 written to a
    temporary folder, over its extraction phase (read, decode, resize, flip, preprocess, forward,
    write: the seconds `extract` reports; the models are built and traced before that clock
    starts), and also over the whole process (start, TensorFlow import, image check and model
    build included);
the ratio (b)/(a) at 10N, also as CPU seconds per image (steadier on a shared machine); the peak
resident memory of `extract` at N and at 10N (each in its own process, read from wait4); and the
wall time of a second `extract` over the same run folder (a cache hit) as a fraction of the
first, at 10N (and at N). Targets are printed with the figures; the last line is one JSON
object for tools.

    python scripts/bench_extract.py --n 64
    python scripts/bench_extract.py --n 16 --views center_pair    # with the new views
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

SHARED_DOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs3"
PHOTO_SIZE = (500, 375)
TARGET_RATIO = 0.95
TARGET_RSS_GROWTH = 0.15
TARGET_CACHE_HIT = 0.05


def source_photos(folder: Path | None = SHARED_DOGS) -> list[Path]:
    """The JPEG photos under `folder` (default dogs3), sorted; none where it is missing."""
    return sorted(folder.rglob("*.jpg")) if folder is not None and folder.is_dir() else []


def photo(index: int, sources: list[Path]) -> np.ndarray:
    """A BGR photo of about 500x375: a source photo (mirrored on odd rounds), else smooth noise."""
    if sources:
        image = cv2.imdecode(np.fromfile(sources[index % len(sources)], dtype=np.uint8), cv2.IMREAD_COLOR)
        if index // len(sources) % 2:
            image = image[:, ::-1]
    else:
        rng = np.random.default_rng(index)
        image = cv2.GaussianBlur(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), (0, 0), 3)
    h, w = image.shape[:2]
    return cv2.resize(image, PHOTO_SIZE if w >= h else PHOTO_SIZE[::-1], interpolation=cv2.INTER_AREA)


def write_dataset(root: Path, n: int, sources: list[Path] | None = None) -> list[Path]:
    """N JPEGs of `photo`s (from `sources`, default dogs3) in the folder layout: 3/4 in
    train/<two classes>/, the rest in a flat test/; written on every core. Returns their paths."""
    sources = source_photos() if sources is None else sources
    n_train = max(2, n * 3 // 4)
    paths = [root / "train" / f"class{i % 2}" / f"img{i:06d}.jpg" if i < n_train else root / "test" / f"img{i:06d}.jpg"
             for i in range(n)]
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        ok, data = cv2.imencode(".jpg", photo(i, sources), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        paths[i].write_bytes(data.tobytes())

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(write, range(n)))
    return paths


def run_child(args: list[str]) -> tuple[dict, float, float]:
    """Run this script in child mode; return its JSON output, wall seconds and peak RSS in MB."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"child {' '.join(args)} failed with exit code {process.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024


def child_forward(opts: argparse.Namespace) -> dict:
    """Seconds per forward batch of batch_size decoded photos (every view), per backbone, through
    the same traced functions that `extract` runs (the views, preprocess_input and the model, in
    one graph per group of views sharing a crop)."""
    from transfer_ensemble import backbones, images
    from transfer_ensemble.config import ExtractConfig
    from transfer_ensemble.features import Extractor

    extractor = Extractor(ExtractConfig(backbones=backbones.parse_backbones(opts.backbones),
                                        weights=opts.weights, image_size=opts.image_size,
                                        batch_size=opts.batch_size, precision=opts.precision, views=opts.views,
                                        mid_layer=opts.mid_layer))
    photos = sorted(Path(opts.data).rglob("*.jpg"))[:opts.batch_size]
    seconds, cpu_seconds = {}, {}
    for spec in extractor.specs:
        size = extractor.config.size_of(spec)
        batch = np.stack([images.load(path, size) for path in photos])
        extractor.forward(spec, batch)
        times, cpu_times = [], []
        for _ in range(opts.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            extractor.forward(spec, batch)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        seconds[spec.name] = statistics.median(times)
        cpu_seconds[spec.name] = statistics.median(cpu_times)
    return {"seconds_per_batch": seconds, "cpu_seconds_per_batch": cpu_seconds,
            "views": len(extractor.config.views)}


def child_extract(opts: argparse.Namespace) -> dict:
    from transfer_ensemble import backbones, workflow
    from transfer_ensemble.config import ExtractConfig

    # One scale: (b) is compared with the forward pass (a) at that scale (the second scale is another pass).
    config = ExtractConfig(backbones=backbones.parse_backbones(opts.backbones), weights=opts.weights,
                           image_size=opts.image_size, batch_size=opts.batch_size, precision=opts.precision,
                           scales=(1.0,), views=opts.views, mid_layer=opts.mid_layer)
    results = workflow.extract(opts.data, opts.run, config)
    return {"computed": sum(r.computed for r in results), "images": sum(r.images for r in results),
            "seconds": sum(r.seconds for r in results), "cpu_seconds": sum(r.cpu_seconds for r in results)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="N: images of the small run (the large has 10N)")
    parser.add_argument("--backbones", default="xception,inception_v3")
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's native size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", default="random",
                        help="random (default: the forward cost does not depend on weight values), "
                             "imagenet, or a folder of .h5 files")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed forward batches per backbone")
    parser.add_argument("--views", default="pair", help="views to extract (default the pair)")
    parser.add_argument("--mid-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="pool the middle layer beside the final one, as extract does by default")
    parser.add_argument("--keep", help="write the data and run folders here and keep them")
    parser.add_argument("--child", choices=["forward", "extract"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps((child_forward if opts.child == "forward" else child_extract)(opts)))
        return

    common = ["--backbones", opts.backbones, "--batch-size", str(opts.batch_size), "--weights", opts.weights,
              "--precision", opts.precision, "--views", opts.views,
              "--mid-layer" if opts.mid_layer else "--no-mid-layer"]
    if opts.image_size:
        common += ["--image-size", str(opts.image_size)]
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="bench_extract_"))
    forward_args = ["--child", "forward", "--repeats", str(opts.repeats), "--data", str(work / "data_10n"), *common]
    try:
        sizes = {"n": opts.n, "10n": 10 * opts.n}
        for key, n in sizes.items():
            shutil.rmtree(work / f"data_{key}", ignore_errors=True)
            shutil.rmtree(work / f"run_{key}", ignore_errors=True)
            write_dataset(work / f"data_{key}", n)
        print(f"wrote {opts.n} and {10 * opts.n} JPEGs of about 500x375 under {work} "
              f"({'dogs3 photos' if source_photos() else 'synthetic'})", flush=True)

        forwards = [forward_figures(run_child(forward_args)[0], opts.batch_size, "before")]
        runs = {}
        for key in sizes:
            args = ["--child", "extract", "--data", str(work / f"data_{key}"), "--run", str(work / f"run_{key}"),
                    *common]
            first, wall, rss = run_child(args)
            second, hit_wall, _ = run_child(args)
            if second["computed"]:
                sys.exit(f"the second extract computed {second['computed']} images: no cache hit")
            runs[key] = {**first, "wall": wall, "rss": rss, "hit_wall": hit_wall}
            print(f"(b) extract {first['computed']} images: {first['computed'] / first['seconds']:.3f} images/s "
                  f"over the extraction ({first['seconds']:.1f} s, CPU {first['cpu_seconds'] / first['seconds']:.2f} "
                  f"cores busy), {first['computed'] / wall:.3f} images/s over the whole process ({wall:.1f} s); "
                  f"peak RSS {rss:.0f} MB; cache hit {hit_wall:.2f} s ({hit_wall / wall:.1%} of the first)",
                  flush=True)
        forwards.append(forward_figures(run_child(forward_args)[0], opts.batch_size, "after"))
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)

    forward_rate = statistics.mean(f["rate"] for f in forwards)
    forward_cpu = statistics.mean(f["cpu_per_image"] for f in forwards)
    big = runs["10n"]
    extract_rate = big["computed"] / big["seconds"]
    extract_cpu = big["cpu_seconds"] / big["computed"]
    ratio = extract_rate / forward_rate
    growth = runs["10n"]["rss"] / runs["n"]["rss"] - 1
    hit = big["hit_wall"] / big["wall"]
    print()
    print(f"settings: {opts.backbones} at {opts.image_size or 'native size'}, batch {opts.batch_size}, "
          f"{opts.precision}, --weights {opts.weights}, --views {opts.views}, N = {opts.n}")
    print(f"forward (a), mean of before/after  {forward_rate:8.3f} images/s   ({forward_cpu:.3f} CPU s/image)")
    print(f"extract (b), {10 * opts.n} images         {extract_rate:8.3f} images/s   ({extract_cpu:.3f} CPU s/image)")
    print(f"ratio (b)/(a), wall clock          {ratio:8.3f}   target >= {TARGET_RATIO}   {verdict(ratio >= TARGET_RATIO)}")
    print(f"ratio of CPU time per image, a/b   {forward_cpu / extract_cpu:8.3f}   (the share of extract's CPU that is "
          f"the forward pass; steadier than wall clock on a shared machine)")
    print(f"peak RSS at N / 10N                {runs['n']['rss']:.0f} / {runs['10n']['rss']:.0f} MB ({growth:+.1%})"
          f"   target within {TARGET_RSS_GROWTH:.0%}   {verdict(abs(growth) <= TARGET_RSS_GROWTH)}")
    print(f"cache hit / first extract, 10N     {hit:8.3f}   target < {TARGET_CACHE_HIT}   "
          f"{verdict(hit < TARGET_CACHE_HIT)}   (at N: {runs['n']['hit_wall'] / runs['n']['wall']:.3f})")
    print(json.dumps({"forward_images_per_s": round(forward_rate, 3), "extract_images_per_s": round(extract_rate, 3),
                      "ratio": round(ratio, 4), "peak_rss_mb_n": round(runs["n"]["rss"], 1),
                      "peak_rss_mb_10n": round(runs["10n"]["rss"], 1), "cache_hit_fraction": round(hit, 4),
                      "cpu_ratio": round(forward_cpu / extract_cpu, 4)}))


def forward_figures(result: dict, batch_size: int, when: str) -> dict:
    """Images/s and CPU seconds per image of (a), printed."""
    per_batch = sum(result["seconds_per_batch"].values())
    cpu_per_batch = sum(result["cpu_seconds_per_batch"].values())
    figures = {"rate": batch_size / per_batch, "cpu_per_image": cpu_per_batch / batch_size}
    print(f"(a) forward, {when}: {figures['rate']:.3f} images/s (" + ", ".join(
        f"{k} {v / (result['views'] * batch_size) * 1000:.0f} ms/view" for k, v in result["seconds_per_batch"].items())
        + f"; CPU {cpu_per_batch / per_batch:.2f} cores busy)", flush=True)
    return figures

if __name__ == "__main__":
    main()

"""Benchmark the whole extraction on a GPU against the backbones' pure forward speed (issue 10).

Made for the lent GPU machine, which has JAX but no TensorFlow: the Keras backend is JAX unless
KERAS_BACKEND says otherwise, and Keras itself may come from a carried wheel on PYTHONPATH. It
writes N JPEGs of about 500x375 (default 20,580, the Kaggle set's size; real dogs3 photos from
--photos, resized and reused, else smooth noise), measures how fast the project's decoding path
(``images.iter_batches``: read, decode, resize, all cores) delivers them and how fast
`extract` itself runs around a model that costs nothing (``bench_decode.feed_rate``: the most
this CPU can feed the GPU), and then, for each precision, in one child process:

(a) forward: images/s of every backbone on both views, on a uint8 batch from the host, through
    the same compiled pass `extract` uses (``Extractor.dispatch``: transfer, preprocess and
    model; the next batch launched before the current one is fetched), after a warm-up;
(b) extract: images/s of ``workflow.extract`` (what `transfer-ensemble extract` runs) on the N
    files, over its extraction phase (read, decode, resize, flip, forward, write: the seconds
    `extract` reports; models are built and compiled before that clock starts);

and prints both, the ratio (b)/(a), the extraction seconds, the decode and feed rates and the
peak GPU memory. The weights are untrained (--weights random): speed does not depend on their values.
The last line is one JSON object.

    python scripts/bench_gpu.py --photos ../shared/data/dogs3
    python scripts/bench_gpu.py --n 64 --image-size 75 --batch-size 8 --forward-batches 4   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

KAGGLE_N = 20_580
TARGET_RATIO = 0.9
TARGET_SECONDS = 15.0


def child(opts: argparse.Namespace) -> dict:
    """(b) extract on the files, then (a) the forward pass alone, in this process, one precision."""
    from transfer_ensemble import backbones, backend, progress, workflow
    from transfer_ensemble.config import ExtractConfig
    from transfer_ensemble.features import Extractor

    progress.show(False)

    # One scale: (b) is compared with the forward pass (a) at that scale (the second scale is another pass).
    config = ExtractConfig(backbones=backbones.parse_backbones(opts.backbones), weights="random",
                           image_size=opts.image_size, batch_size=opts.batch_size, precision=opts.precision,
                           scales=(1.0,))
    start = time.perf_counter()
    results = workflow.extract(opts.data, opts.run, config)
    wall = time.perf_counter() - start
    computed = sum(r.computed for r in results)
    seconds = sum(r.seconds for r in results)
    peak = backend.peak_memory()

    extractor = Extractor(config)
    rng = np.random.default_rng(0)
    batches = {}
    for spec in extractor.specs:
        size = config.size_of(spec)
        batches[spec.name] = rng.integers(0, 256, (opts.batch_size, size, size, 3), dtype=np.uint8)
        extractor.forward(spec, batches[spec.name])
    begin = time.perf_counter()
    previous: list = []
    for _ in range(opts.forward_batches):
        launched = [extractor.dispatch(spec, batches[spec.name]) for spec in extractor.specs]
        for result in previous:
            result()
        previous = launched
    for result in previous:
        result()
    forward = opts.forward_batches * opts.batch_size / (time.perf_counter() - begin)
    return {"backend": backend.name(), "devices": backend.devices(), "precision": opts.precision,
            "forward_images_per_s": forward, "extract_images_per_s": computed / seconds,
            "extract_seconds": seconds, "extract_wall_seconds": wall, "computed": computed,
            "peak_gpu_bytes": peak}


def run_child(opts: argparse.Namespace, precision: str, data: Path, run: Path) -> dict:
    args = [sys.executable, __file__, "--child", "--precision", precision, "--data", str(data), "--run", str(run),
            "--backbones", opts.backbones, "--batch-size", str(opts.batch_size),
            "--forward-batches", str(opts.forward_batches)]
    if opts.image_size:
        args += ["--image-size", str(opts.image_size)]
    process = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    if process.returncode != 0:
        sys.exit(f"the {precision} child failed with exit code {process.returncode}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=KAGGLE_N, help="images to write and extract")
    parser.add_argument("--photos", type=Path, help="a folder of JPEG photos to reuse (e.g. dogs3)")
    parser.add_argument("--backbones", default="xception,inception_v3")
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's native size")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (twice as many views)")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--forward-batches", type=int, default=40, help="timed batches of (a)")
    parser.add_argument("--work", type=Path, help="write the images and run folders here and keep them")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(opts)), flush=True)
        return

    from bench_decode import feed_rate, stream_rate
    from bench_extract import source_photos, write_dataset
    from transfer_ensemble import backbones, images

    work = opts.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        start = time.perf_counter()
        sources = source_photos(opts.photos) if opts.photos is not None else []
        if opts.photos is not None and not sources:
            sys.exit(f"--photos {opts.photos} holds no .jpg files; pass a folder of JPEG photos or leave it out")
        paths = write_dataset(work / "data", opts.n, sources)
        print(f"wrote {opts.n} JPEGs of about 500x375 ({'photos from ' + str(opts.photos) if opts.photos else 'synthetic'}) "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        size = opts.image_size or backbones.get_spec(opts.backbones.split(",")[0]).size
        decode = stream_rate(paths, len(paths), size, opts.batch_size, images.default_workers())
        print(f"decode (read, decode, resize to {size}; {images.default_workers()} threads): {decode:.0f} images/s",
              flush=True)
        feed = feed_rate(paths, len(paths), size, opts.batch_size)
        print(f"extract around a model that costs nothing: {feed:.0f} images/s", flush=True)
        rows = []
        for precision in opts.precisions.split(","):
            shutil.rmtree(work / f"run_{precision}", ignore_errors=True)
            row = run_child(opts, precision, work / "data", work / f"run_{precision}")
            row["ratio"] = row["extract_images_per_s"] / row["forward_images_per_s"]
            rows.append(row)
            peak = row["peak_gpu_bytes"]
            print(f"{precision}: (a) forward {row['forward_images_per_s']:.0f} images/s; (b) extract "
                  f"{row['extract_images_per_s']:.0f} images/s ({row['computed']} images in "
                  f"{row['extract_seconds']:.1f} s; {row['extract_wall_seconds']:.1f} s with the image check and "
                  f"model builds); (b)/(a) {row['ratio']:.3f}; peak GPU memory "
                  f"{'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}", flush=True)
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"backend {rows[0]['backend']} on {', '.join(rows[0]['devices'])}; {opts.backbones} at "
          f"{opts.image_size or 'native size'}, batch {opts.batch_size} images ({2 * opts.batch_size} views), "
          f"N = {opts.n}, untrained weights")
    for row in rows:
        verdicts = f"(b)/(a) {row['ratio']:.3f} target >= {TARGET_RATIO} {'PASS' if row['ratio'] >= TARGET_RATIO else 'FAIL'}"
        if row["precision"] == "float32" and opts.n == KAGGLE_N:
            ok = row["extract_seconds"] <= TARGET_SECONDS
            verdicts += f"; extraction {row['extract_seconds']:.1f} s target <= {TARGET_SECONDS:.0f} s {'PASS' if ok else 'FAIL'}"
        print(f"{row['precision']:9s} {verdicts}")
    print(json.dumps({"n": opts.n, "decode_images_per_s": round(decode, 1), "feed_images_per_s": round(feed, 1),
                      "backend": rows[0]["backend"],
                      "devices": rows[0]["devices"], "batch_size": opts.batch_size,
                      "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                   if k not in ("backend", "devices")} for row in rows]}))


if __name__ == "__main__":
    main()

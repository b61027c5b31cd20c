"""Can the CPU feed the model? Throughput of the image stream alone, and of `extract` around a free model.

`extract` decodes and resizes images in background threads (`images.iter_batches`) while the
backbones run. On a GPU the backbones take well under a millisecond per view, so the stream,
not the model, can set the pace. This streams N photos (the folder's photos cycled, at the
backbones' native 299 px, as `extract` reads them) with 1, 2, 4... threads up to every core, and
prints images/s for each next to the ideal (threads x one thread's rate). Then it runs
`features.extract_split` itself on the same N images with both backbones replaced by a forward
pass that costs nothing (it returns zeros at once): the rate `extract` could feed a GPU at on
this CPU, with every step but the model (decoding, launching, fetching, writing and committing
the stores). The last line is one JSON object.

    python scripts/bench_decode.py --photos ../shared/data/dogs3 --n 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_precision import SHARED_DOGS, photo_paths  # noqa: E402
from transfer_ensemble import backbones, backend, features, images, progress  # noqa: E402
from transfer_ensemble.config import ExtractConfig  # noqa: E402
from transfer_ensemble.store import StoreFiles  # noqa: E402


def stream_rate(paths: list[Path], n: int, size: int, batch_size: int, workers: int) -> float:
    """Images per second through `iter_batches` with `workers` threads."""
    rows = np.arange(n) % len(paths)
    start = time.perf_counter()
    count = sum(len(batch.rows) for batch in images.iter_batches(paths, rows, size, batch_size,
                                                                   workers=workers))
    assert count == n
    return n / (time.perf_counter() - start)


def free_forward(model, preprocess, size: int, batch: int, replicas=None, views=("original", "flipped")) -> backend.Forward:
    """A stand-in for `backend.compile_forward` whose pass costs nothing: zeros for every view."""
    return backend.Forward(lambda pixels: len(pixels), lambda n: np.zeros((len(views) * n, 2048), np.float32))


def feed_rate(paths: list[Path], n: int, size: int, batch_size: int) -> float:
    """Images/s of `features.extract_split` on N images with backbones that cost nothing."""
    backbones.build = lambda *args, **kwargs: None
    backend.compile_forward = free_forward
    progress.show(False)
    logging.getLogger("transfer_ensemble").setLevel(logging.ERROR)  # no "--weights random" warning
    work = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    try:
        config = ExtractConfig(backbones=("xception", "inception_v3"), weights="random", image_size=size,
                               batch_size=batch_size, scales=(1.0,))
        rows = np.arange(n) % len(paths)
        extractor = features.Extractor(config)
        extractor.replicas = None  # one free "device"; looking for others would start TensorFlow
        result = features.extract_split(extractor, "test", [paths[r] for r in rows],
                                        [str(i) for i in range(n)], [f"key{i}" for i in range(n)],
                                        lambda name: StoreFiles(work / name))
        assert result.computed == n
        return n / result.seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=SHARED_DOGS, help="folder of photos (searched recursively)")
    parser.add_argument("--n", type=int, default=2000, help="images streamed per thread count")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=32)
    opts = parser.parse_args()

    paths = photo_paths(opts.photos)
    sizes = [images.decode(p).shape[:2] for p in paths[:50]]
    cores = images.default_workers()
    counts = sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k < cores], cores})
    print(f"{len(paths)} photos (median {int(np.median([s[1] for s in sizes]))}x"
          f"{int(np.median([s[0] for s in sizes]))} px) cycled to {opts.n}, at {opts.image_size} px, "
          f"batch {opts.batch_size}; default threads here: {cores}", flush=True)
    stream_rate(paths, min(opts.n, 2 * opts.batch_size), opts.image_size, opts.batch_size, 1)
    rates = {}
    for workers in counts:
        rates[workers] = stream_rate(paths, opts.n, opts.image_size, opts.batch_size, workers)
        print(f"  {workers:3d} threads: {rates[workers]:7.0f} images/s  "
              f"({rates[workers] / (workers * rates[1]):.0%} of {workers} x one thread)", flush=True)
    feed = feed_rate(paths, opts.n, opts.image_size, opts.batch_size)
    print(f"  extract around a free model, {cores} threads: {feed:7.0f} images/s "
          f"({feed / rates[cores]:.0%} of the stream alone)", flush=True)
    print(json.dumps({"default_workers": cores, "images_per_s": {str(k): round(v, 1) for k, v in rates.items()},
                      "feed_images_per_s": round(feed, 1)}))


if __name__ == "__main__":
    main()

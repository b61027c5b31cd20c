"""Can the CPU feed the model? Throughput of the image stream alone, per number of decoding threads.

`extract` decodes, resizes and mirrors images in background threads (`images.iter_batches`)
while the backbones run. On a GPU the backbones take well under a millisecond per view, so the
stream, not the model, can set the pace. This streams N photos (the folder's photos cycled, at
the backbones' native 299 px, mirrored as `extract` does) with 1, 2, 4... threads up to every
core, and prints images/s for each next to the ideal (threads x one thread's rate). The last
line is one JSON object.

    python scripts/bench_decode.py --photos ../shared/data/dogs3 --n 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_precision import SHARED_DOGS, photo_paths  # noqa: E402
from transfer_ensemble import images  # noqa: E402


def stream_rate(paths: list[Path], n: int, size: int, batch_size: int, workers: int) -> float:
    """Images per second through `iter_batches` with `workers` threads (mirrors included)."""
    rows = np.arange(n) % len(paths)
    start = time.perf_counter()
    count = sum(len(batch.rows) for batch in images.iter_batches(paths, rows, size, batch_size,
                                                                   workers=workers, mirrored=True))
    assert count == n
    return n / (time.perf_counter() - start)


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
          f"batch {opts.batch_size}, mirrored; default threads here: {cores}", flush=True)
    stream_rate(paths, min(opts.n, 2 * opts.batch_size), opts.image_size, opts.batch_size, 1)
    rates = {}
    for workers in counts:
        rates[workers] = stream_rate(paths, opts.n, opts.image_size, opts.batch_size, workers)
        print(f"  {workers:3d} threads: {rates[workers]:7.0f} images/s  "
              f"({rates[workers] / (workers * rates[1]):.0%} of {workers} x one thread)", flush=True)
    print(json.dumps({"default_workers": cores, "images_per_s": {str(k): round(v, 1) for k, v in rates.items()}}))


if __name__ == "__main__":
    main()

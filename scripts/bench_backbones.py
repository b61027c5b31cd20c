"""Forward speed of the recommended backbones at their native size, beside Xception and
InceptionV3, in one run (random weights: the speed does not depend on them).

For each backbone: images/s of the traced pass `extract` runs (uint8 batch and its mirror, cast,
preprocessing, model, pooling), median of --repeats batches after a warm-up one, and the ratio
to Xception's, which is steadier than the absolute figure on a shared CPU. The last line is
one JSON object for tools.

    python scripts/bench_backbones.py --batch-size 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

RECOMMENDED = ("xception,inception_v3,efficientnet_v2_l,dinov2_small,dinov2_large,"
               "dinov2_with_registers_large,clip_vit_large_patch14,siglip2_so400m_patch14_384,"
               "efficientnet_b3_ra2_imagenet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default=RECOMMENDED)
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch (each also mirrored)")
    parser.add_argument("--repeats", type=int, default=1, help="timed batches per backbone")
    opts = parser.parse_args()

    from transfer_ensemble import backbones, backend
    from transfer_ensemble.config import ExtractConfig
    from transfer_ensemble.features import Extractor

    extractor = Extractor(ExtractConfig(backbones=backbones.parse_backbones(opts.backbones), weights="random",
                                        batch_size=opts.batch_size, scales=(1.0,)))
    rng = np.random.default_rng(0)
    rows = {}
    for spec in extractor.specs:
        size = extractor.size(spec)
        start = time.perf_counter()
        run = extractor.model(spec).run
        built = time.perf_counter() - start
        batch = rng.integers(0, 256, (opts.batch_size, size, size, 3), dtype=np.uint8)
        run(batch)
        times = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
        rows[spec.name] = {"size": size, "width": spec.width, "build_s": round(built, 1),
                           "images_per_s": opts.batch_size / statistics.median(times)}
        extractor._models.pop(spec.name)  # free the model before the next one
        print(f"{spec.name:30s} {size:4d} px  width {spec.width:5d}  "
              f"{rows[spec.name]['images_per_s']:7.2f} img/s (built in {built:.0f} s)", flush=True)
    base = rows.get("xception", next(iter(rows.values())))["images_per_s"]
    print(f"\n{'backbone':30s} {'px':>4s} {'width':>6s} {'img/s':>8s} {'x Xception':>10s}")
    for name, row in rows.items():
        row["ratio_to_xception"] = row["images_per_s"] / base
        print(f"{name:30s} {row['size']:4d} {row['width']:6d} {row['images_per_s']:8.2f} "
              f"{row['ratio_to_xception']:10.3f}")
    print(json.dumps({"backend": backend.name(), "batch_size": opts.batch_size, "backbones": rows}))


if __name__ == "__main__":
    main()

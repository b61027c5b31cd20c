"""Does `--precision bfloat16` pay on this machine? Forward speed and feature fidelity vs float32.

Both precisions run the same backbones with the same weights (random by default: no ImageNet
weights here; the cost of a forward pass does not depend on the weight values, and the gap
between the two precisions still measures bf16's numerical fidelity) on the same real photos of
../shared/data/dogs3, original and flipped in one batch as `extract` does. Fidelity per image:
cosine similarity and relative error ||bf16 - fp32|| / ||fp32||, and the same after subtracting
the mean fp32 feature over the photos (untrained backbones give every image a similar feature,
which would make the raw cosine look better than it is). The last line is one JSON object.

    python scripts/bench_precision.py --images 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from transfer_ensemble import backbones, images
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.features import Extractor

SHARED_DOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs3"


def photo_paths(folder: Path, count: int | None = None) -> list[Path]:
    """The first `count` (default: all) photos under `folder`, searched recursively, sorted."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths or (count is not None and len(paths) < count):
        raise SystemExit(f"need {count or 1} photos under {folder}, found {len(paths)}")
    return paths[:count]


def photos(count: int, size: int, folder: Path = SHARED_DOGS) -> np.ndarray:
    return np.stack([images.load(p, size) for p in photo_paths(folder, count)])


def forward_all(extractor: Extractor, spec: backbones.BackboneSpec, pixels: np.ndarray,
                batch_size: int) -> np.ndarray:
    """Features of every photo and then of every mirror, in batches as `extract` runs them."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start:start + batch_size]
        views = extractor.forward(spec, batch)
        out.append(np.concatenate([views["original"], views["flipped"]]))
    return np.concatenate(out)


def timed(extractors: dict[str, Extractor], spec: backbones.BackboneSpec, pixels: np.ndarray,
          batch_size: int, repeats: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each precision's features, and its median seconds per source image (two views).

    The precisions take turns, pass after pass, so that load from other processes on a shared
    machine falls on both alike.
    """
    for extractor in extractors.values():
        extractor.forward(spec, pixels[:batch_size])
    times: dict[str, list[float]] = {name: [] for name in extractors}
    features: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, extractor in extractors.items():
            start = time.perf_counter()
            features[name] = forward_all(extractor, spec, pixels, batch_size)
            times[name].append((time.perf_counter() - start) / len(pixels))
    return features, {name: statistics.median(t) for name, t in times.items()}


def fidelity(reference: np.ndarray, other: np.ndarray) -> dict:
    def rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cosine = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
        return cosine, np.linalg.norm(a - b, axis=1) / np.maximum(na, 1e-30)

    cosine, rel = rows(reference, other)
    mean = reference.mean(axis=0)
    c_cosine, c_rel = rows(reference - mean, other - mean)
    spread, _ = rows(reference[:-1], reference[1:])
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "rel_error_mean": float(rel.mean()), "rel_error_max": float(rel.max()),
            "centred_cosine_mean": float(c_cosine.mean()), "centred_cosine_min": float(c_cosine.min()),
            "centred_rel_error_mean": float(c_rel.mean()), "centred_rel_error_max": float(c_rel.max()),
            "fp32_cosine_between_images": float(spread.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="photos from dogs3 (each also flipped)")
    parser.add_argument("--backbones", default="xception,inception_v3")
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's native size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the photos per precision")
    opts = parser.parse_args()

    names = backbones.parse_backbones(opts.backbones)
    common = dict(backbones=names, weights=opts.weights, image_size=opts.image_size, batch_size=opts.batch_size)
    fp32 = Extractor(ExtractConfig(precision="float32", **common))
    bf16 = Extractor(ExtractConfig(precision="bfloat16", **common))
    results, total = {}, {"float32": 0.0, "bfloat16": 0.0}
    for spec in fp32.specs:
        size = fp32.config.size_of(spec)
        pixels = photos(opts.images, size)
        bf16.model(spec).model.set_weights(fp32.model(spec).model.get_weights())
        features, seconds = timed({"float32": fp32, "bfloat16": bf16}, spec, pixels, opts.batch_size, opts.repeats)
        ref, got, t32, t16 = features["float32"], features["bfloat16"], seconds["float32"], seconds["bfloat16"]
        total["float32"] += t32
        total["bfloat16"] += t16
        results[spec.name] = {"ms_per_image_float32": t32 * 1000, "ms_per_image_bfloat16": t16 * 1000,
                              "speedup": t32 / t16, **fidelity(ref, got)}
        r = results[spec.name]
        print(f"{spec.name} @{size}px, {opts.images} photos x 2 views, batch {opts.batch_size}:")
        print(f"  forward float32 {r['ms_per_image_float32']:.0f} ms/image, bfloat16 "
              f"{r['ms_per_image_bfloat16']:.0f} ms/image: speed-up x{r['speedup']:.2f}")
        print(f"  cosine(bf16, fp32) mean {r['cosine_mean']:.6f} min {r['cosine_min']:.6f}; relative error "
              f"mean {r['rel_error_mean']:.4f} max {r['rel_error_max']:.4f}")
        print(f"  centred on the mean fp32 feature: cosine mean {r['centred_cosine_mean']:.4f} min "
              f"{r['centred_cosine_min']:.4f}; relative error mean {r['centred_rel_error_mean']:.4f} max "
              f"{r['centred_rel_error_max']:.4f} (fp32 cosine between different photos: "
              f"{r['fp32_cosine_between_images']:.4f})", flush=True)
    speedup = total["float32"] / total["bfloat16"]
    print(f"all backbones: float32 {total['float32'] * 1000:.0f} ms/image, bfloat16 "
          f"{total['bfloat16'] * 1000:.0f} ms/image: speed-up x{speedup:.2f}")
    print(json.dumps({"speedup": round(speedup, 3), "backbones": results}))


if __name__ == "__main__":
    main()

"""bf16 against float32 for the backbones alone, on any Keras 3 backend (JAX, PyTorch, TensorFlow).

`scripts/bench_precision.py` measures the tool's own TensorFlow extractor. This script measures
the same question where TensorFlow is not installed (a GPU box with only JAX or PyTorch): the
same keras.applications backbones, the same random weights in both precisions (bf16 through
Keras's "mixed_bfloat16" policy), fed uint8 photos with the backbone's preprocess_input inside
the model as `extract` does, each photo with its mirror in the same batch. It prints the forward
time per view for both precisions and the fidelity of bf16 (cosine similarity and relative error
to float32, raw and centred on the mean float32 feature). The last line is one JSON object.

    KERAS_BACKEND=jax python scripts/bench_precision_keras.py --photos ../shared/data/dogs3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_precision import SHARED_DOGS, fidelity, photos  # noqa: E402
from transfer_ensemble import backbones  # noqa: E402


def photo_views(folder: Path, count: int, size: int) -> np.ndarray:
    """`count` photos of `folder` at `size` px, each followed by its left-right mirror (uint8)."""
    pixels = photos(count, size, folder)
    return np.stack([pixels, pixels[:, :, ::-1]], axis=1).reshape(-1, size, size, 3)


def uint8_model(spec: backbones.BackboneSpec, size: int, policy: str, weights: list | None):
    """uint8 pixels -> preprocess_input -> frozen pooled backbone -> float32 features."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        backbone = backbones.build(spec, backbones.WeightsSource("random", None, "random:seed=0"), size)
        if weights is not None:
            backbone.set_weights(weights)
        preprocess = backbones.preprocess_input(spec)
        inputs = keras.Input((size, size, 3), dtype="uint8")
        x = keras.layers.Lambda(lambda t: preprocess(keras.ops.cast(t, "float32")), dtype="float32")(inputs)
        x = backbone(x, training=False)
        outputs = keras.layers.Activation("linear", dtype="float32")(x)
        return keras.Model(inputs, outputs), backbone.get_weights()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def seconds_per_view(model, batch: np.ndarray, repeats: int) -> float:
    """Median wall time of one jit-compiled forward batch (result fetched to the host), per view."""
    for _ in range(2):
        model.predict_on_batch(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=SHARED_DOGS, help="folder of photos (searched recursively)")
    parser.add_argument("--images", type=int, default=64, help="photos for fidelity (each also mirrored)")
    parser.add_argument("--backbones", default="xception,inception_v3")
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's native size")
    parser.add_argument("--batch-size", type=int, default=128, help="views per timed forward batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per precision (median)")
    opts = parser.parse_args()

    import keras

    device = keras.backend.backend()
    if device == "jax":
        import jax
        device += f" {jax.__version__} on {jax.devices()[0].device_kind}"
    print(f"keras {keras.__version__}, backend {device}", flush=True)
    results, total = {}, {"float32": 0.0, "bfloat16": 0.0}
    for name in backbones.parse_backbones(opts.backbones):
        spec = backbones.get_spec(name)
        size = opts.image_size or spec.size
        views = photo_views(opts.photos, opts.images, size)
        fp32, weights = uint8_model(spec, size, "float32", None)
        bf16, _ = uint8_model(spec, size, "mixed_bfloat16", weights)
        ref, got = (np.concatenate([model.predict_on_batch(views[i:i + opts.batch_size])
                                    for i in range(0, len(views), opts.batch_size)]) for model in (fp32, bf16))
        batch = np.resize(views, (opts.batch_size, *views.shape[1:]))
        t32 = seconds_per_view(fp32, batch, opts.repeats)
        t16 = seconds_per_view(bf16, batch, opts.repeats)
        total["float32"] += t32
        total["bfloat16"] += t16
        r = results[name] = {"ms_per_view_float32": t32 * 1000, "ms_per_view_bfloat16": t16 * 1000,
                             "speedup": t32 / t16, **fidelity(ref.astype(np.float64), got.astype(np.float64))}
        print(f"{name} @{size}px, batch {opts.batch_size} views: float32 {r['ms_per_view_float32']:.2f} ms/view, "
              f"bfloat16 {r['ms_per_view_bfloat16']:.2f} ms/view, speed-up x{r['speedup']:.2f}; "
              f"{len(views)} views: cosine mean {r['cosine_mean']:.6f} min {r['cosine_min']:.6f}, "
              f"rel. error mean {r['rel_error_mean']:.4f} max {r['rel_error_max']:.4f}, centred cosine "
              f"{r['centred_cosine_mean']:.4f}, centred rel. error {r['centred_rel_error_mean']:.4f}", flush=True)
    speedup = total["float32"] / total["bfloat16"]
    print(f"all backbones: float32 {total['float32'] * 1000:.2f} ms/view, bfloat16 "
          f"{total['bfloat16'] * 1000:.2f} ms/view, speed-up x{speedup:.2f}")
    print(json.dumps({"backend": device, "speedup": round(speedup, 3), "backbones": results}))


if __name__ == "__main__":
    main()

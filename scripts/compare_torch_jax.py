"""The torch backend's forward pass against JAX's on a GPU: the same untrained weights file
(saved once by JAX), the features of 16 random uint8 images compared, and views/s of each
backbone at 299 px on batches of 128 views (5 timed passes after a warm-up, fetched each time).

Run on the lent GPU machine with the carried Keras wheel on PYTHONPATH:
    python3 scripts/compare_torch_jax.py
"""
import os, subprocess, sys
import numpy as np

SAVE = """
import sys, h5py, keras
from keras.src.legacy.saving import legacy_h5_format
from transfer_ensemble import backbones
for seed, name in enumerate(["xception", "inception_v3"]):
    spec = backbones.get_spec(name)
    keras.utils.set_random_seed(seed)
    m = getattr(keras.applications, spec.constructor)(include_top=False, pooling="avg", weights=None, input_shape=(299, 299, 3))
    with h5py.File(f"{sys.argv[1]}/{spec.weights_file}", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, m)
"""
RUN = """
import sys, time, json, numpy as np
from transfer_ensemble import backend, features
from transfer_ensemble.config import ExtractConfig
e = features.Extractor(ExtractConfig(weights=sys.argv[1], batch_size=64))
x = np.load(sys.argv[2]); out = {}
rate = {}
for s in e.specs:
    out[s.name] = np.concatenate(list(e.forward(s, x[:16]).values()))
    big = np.random.default_rng(0).integers(0, 256, (64, 299, 299, 3), dtype=np.uint8)
    e.forward(s, big); t = time.perf_counter()
    for _ in range(5): e.forward(s, big)
    rate[s.name] = 5 * 128 / (time.perf_counter() - t)
np.savez(sys.argv[3], **out)
print(json.dumps({"backend": backend.name(), "views_per_s": rate, "peak": backend.peak_memory()}))
"""
w = "/tmp/wts"; os.makedirs(w, exist_ok=True)
env = {**os.environ}
subprocess.run([sys.executable, "-c", SAVE, w], check=True, env={**env, "KERAS_BACKEND": "jax"})
np.save("/tmp/x.npy", np.random.default_rng(1).integers(0, 256, (16, 299, 299, 3), dtype=np.uint8))
res = {}
for b in ("jax", "torch"):
    p = subprocess.run([sys.executable, "-c", RUN, w, "/tmp/x.npy", f"/tmp/{b}.npz"], env={**env, "KERAS_BACKEND": b},
                       stdout=subprocess.PIPE, text=True)
    print(b, p.returncode, p.stdout.strip().splitlines()[-1:] , flush=True)
    res[b] = np.load(f"/tmp/{b}.npz") if p.returncode == 0 else None
if res["torch"] is not None:
    for n in ("xception", "inception_v3"):
        a, t = res["jax"][n], res["torch"][n]
        cos = (a * t).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(t, axis=1)
        print(n, "min cosine jax vs torch", float(cos.min()), "max abs diff", float(np.abs(a - t).max()), flush=True)

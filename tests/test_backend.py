"""Keras backends: which one runs, the same features from each, several devices, determinism.

A process has one Keras backend, so each backend's side runs in its own subprocess; the tests
marked `backend` elsewhere run the workflow itself once per backend (`make test`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, draw
from transfer_ensemble import backbones, backend

SAVE_WEIGHTS = textwrap.dedent("""
    import sys, h5py, keras
    from keras.src.legacy.saving import legacy_h5_format
    from transfer_ensemble import backbones
    folder = sys.argv[1]
    for seed, name in enumerate(["xception", "inception_v3"]):
        spec = backbones.get_spec(name)
        keras.utils.set_random_seed(seed)
        model = getattr(keras.applications, spec.constructor)(include_top=False, pooling="avg", weights=None,
                                                              input_shape=(%d, %d, 3))
        with h5py.File(f"{folder}/{spec.weights_file}", "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
""" % (TINY, TINY))

FORWARD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from transfer_ensemble import backend, features
    from transfer_ensemble.config import ExtractConfig
    weights, pixels, out = sys.argv[1:]
    extractor = features.Extractor(ExtractConfig(weights=weights, image_size=%d))
    batch = np.load(pixels)
    np.savez(out, **{f"{spec.name}/{view}": values for spec in extractor.specs
                     for view, values in extractor.forward(spec, batch).items()})
    print(json.dumps({"backend": backend.name(), "tensorflow": "tensorflow" in sys.modules}))
""" % TINY)


def _python(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> str:
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            env=full, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_name_follows_the_environment_then_keras_json_then_tensorflow(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert backend.name() == "tensorflow"
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    assert backend.name() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert backend.name() == "torch"


@pytest.mark.slow
def test_name_is_what_keras_itself_chooses(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    script = ("from transfer_ensemble import backend; before = backend.name(); import keras; "
              "print(before, keras.backend.backend())")
    env = {"KERAS_HOME": str(tmp_path), "KERAS_BACKEND": ""}
    env_without = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**env_without, "KERAS_HOME": env["KERAS_HOME"], "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["jax", "jax"]


@pytest.mark.slow
@pytest.mark.parametrize("other", ["jax", "torch"])
def test_tensorflow_and_other_backends_give_the_same_features_from_one_weights_file(tmp_path, other):
    """Untrained weights saved once as .h5 files and loaded by each backend through --weights DIR
    (the folder the CLI takes): the same features."""
    if not _installed(other):
        pytest.skip(f"{other} is not installed (optional backend)")
    weights = tmp_path / "weights"
    weights.mkdir()
    _python(SAVE_WEIGHTS, str(weights), env={"KERAS_BACKEND": "tensorflow"})
    rng = np.random.default_rng(0)
    pixels = np.stack([draw(i, rng, size=TINY) for i in range(3)])
    np.save(tmp_path / "pixels.npy", pixels)
    runs = {}
    for name in ("tensorflow", other):
        info = json.loads(_python(FORWARD, str(weights), str(tmp_path / "pixels.npy"),
                                  str(tmp_path / f"{name}.npz"), env={"KERAS_BACKEND": name}))
        assert info["backend"] == name
        runs[name] = np.load(tmp_path / f"{name}.npz")
    for key in (f"{spec}/{view}" for spec in ("xception", "inception_v3") for view in ("original", "flipped")):
        a, b = runs["tensorflow"][key], runs[other][key]
        assert a.shape == b.shape == (3, 2048 + backbones.get_spec(key.split("/")[0]).mid_width)
        cosine = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() >= 0.9999, (key, cosine)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(a).max())


REPLICAS = textwrap.dedent("""
    import sys
    import numpy as np
    if sys.argv[1] == "tensorflow":  # two logical CPUs; JAX gets two devices from XLA_FLAGS
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from transfer_ensemble import backend, features
    from transfer_ensemble.config import ExtractConfig
    config = ExtractConfig(backbones=("mobilenet_v3_small",), weights="random", image_size=64)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    single = features.Extractor(config)
    single.replicas = None
    expected = single.forward(single.specs[0], pixels)
    parallel = features.Extractor(config)
    got = parallel.forward(parallel.specs[0], pixels)
    assert len(backend.devices()) == 2 and len(parallel.replicas.devices) == 2, backend.devices()
    if sys.argv[1] == "tensorflow":
        assert parallel.replicas.handle.num_replicas_in_sync == 2
    else:
        weights = parallel.model(parallel.specs[0]).model.weights[0].value
        assert len(weights.sharding.device_set) == 2, weights.sharding
    for view in ("original", "flipped"):
        assert got[view].shape == expected[view].shape == (5, 576), (got[view].shape, expected[view].shape)
        np.testing.assert_allclose(got[view], expected[view], rtol=1e-5, atol=1e-6)
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tensorflow", "jax"])
def test_replicas_over_two_virtual_devices_give_each_image_its_own_features(name):
    """Two virtual CPU devices stand in for two GPUs (MirroredStrategy on TensorFlow,
    DataParallel on JAX): the weights are on both, the odd batch of 5 is split (padded and
    trimmed on JAX), and each image gets exactly its single-device features, in both views."""
    if not _installed(name):
        pytest.skip(f"{name} is not installed")
    out = _python(REPLICAS, name, env={"KERAS_BACKEND": name,
                                       "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out == "ok"


@pytest.mark.slow
@pytest.mark.backend
def test_the_seed_head_is_deterministic_on_this_backend():
    """The same seed gives the same head, to the bit, whichever backend this process runs."""
    from transfer_ensemble.heads import SeedHead

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)

    def fitted(seed: int):
        head = SeedHead(epochs=3, patience=2, batch_size=16, n_classes=2)
        head.fit([x[:40]], y[:40], [x[40:]], y[40:], seed)
        return head.predict_proba(x)

    runs = [fitted(seed) for seed in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_only_the_adapter_imports_a_framework():
    """TensorFlow, JAX and torch are imported by backend.py alone (keras is backend-neutral)."""
    source = Path(backend.__file__).parent
    pattern = ("import tensorflow", "from tensorflow", "import jax", "from jax", "import torch", "from torch")
    offenders = [f"{path.name}: {line.strip()}" for path in sorted(source.glob("*.py")) if path.name != "backend.py"
                 for line in path.read_text().splitlines() if line.strip().startswith(pattern)]
    assert offenders == []

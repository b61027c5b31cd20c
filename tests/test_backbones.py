"""The backbone registry: every family builds, runs and pools to its registered width."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY, run_cli

from transfer_ensemble import backbones
from transfer_ensemble.errors import UserError
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.features import Extractor

# One backbone per keras.applications family in the registry. Every entry's width was also
# checked by building it at 32 px (71 and 75 px for Xception and the Inceptions).
FAMILIES = ["xception", "inception_v3", "inception_resnet_v2", "resnet50_v2", "densenet121",
            "efficientnet_b0", "efficientnet_v2_b0", "convnext_tiny", "mobilenet_v2", "mobilenet_v3_small",
            "nasnet_mobile"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_builds_and_pools_to_its_registered_width(name):
    spec = backbones.get_spec(name)
    extractor = Extractor(ExtractConfig(backbones=(name,), weights="random", image_size=TINY))
    pixels = np.random.default_rng(0).integers(0, 256, (3, TINY, TINY, 3), dtype=np.uint8)
    for out in extractor.forward(spec, pixels).values():
        assert out.shape == (3, spec.width)
        assert out.dtype == np.float32 and np.isfinite(out).all()


def test_every_registry_entry_names_a_keras_constructor_and_preprocessing():
    import keras

    assert len(backbones.REGISTRY) >= 30
    for spec in backbones.REGISTRY.values():
        assert callable(getattr(keras.applications, spec.constructor)), spec.name
        assert callable(getattr(keras.applications, spec.module).preprocess_input), spec.name
        assert spec.width > 0 and spec.size >= 224 and spec.weights_file.endswith(".h5")


def test_names_are_normalised_and_wrong_names_list_the_valid_ones():
    assert backbones.parse_backbones("Xception, Inception-V3") == ("xception", "inception_v3")
    with pytest.raises(UserError) as info:
        backbones.parse_backbones("xception,resnet50v3")
    message = str(info.value)
    assert "'resnet50v3'" in message
    assert all(name in message for name in backbones.REGISTRY)
    with pytest.raises(UserError, match="twice"):
        backbones.parse_backbones("xception,xception")


@pytest.mark.slow
def test_cli_rejects_a_wrong_backbone_before_building_anything(tmp_path):
    result = run_cli("extract", "--data", str(tmp_path), "--run", str(tmp_path / "run"),
                     "--backbones", "xceptoin")
    assert result.returncode == 2
    assert "Unknown backbone 'xceptoin'" in result.stderr and "mobilenet_v3_small" in result.stderr


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from transfer_ensemble import features
    from transfer_ensemble.config import ExtractConfig
    config = ExtractConfig(backbones=("mobilenet_v3_small",), weights="random", image_size=64)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    single = features.Extractor(config)
    single.replicas = None
    expected = single.forward(single.specs[0], pixels)
    mirrored = features.Extractor(config)
    got = mirrored.forward(mirrored.specs[0], pixels)
    assert mirrored.replicas.handle.num_replicas_in_sync == 2
    for view in ("original", "flipped"):
        assert got[view].shape == expected[view].shape == (5, 576), (got[view].shape, expected[view].shape)
        np.testing.assert_allclose(got[view], expected[view], rtol=1e-5, atol=1e-6)
    print("ok")
""")


@pytest.mark.slow
def test_mirrored_strategy_splits_batches_across_replicas():
    """Two logical CPUs stand in for two GPUs: each image gets exactly one feature row."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")

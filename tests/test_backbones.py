"""The backbone registry: every family builds, runs and pools to its registered width."""

from __future__ import annotations

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
    """The registered width, and the middle layer's after it where the backbone declares one."""
    spec = backbones.get_spec(name)
    extractor = Extractor(ExtractConfig(backbones=(name,), weights="random", image_size=TINY))
    pixels = np.random.default_rng(0).integers(0, 256, (3, TINY, TINY, 3), dtype=np.uint8)
    for out in extractor.forward(spec, pixels).values():
        assert out.shape == (3, spec.width + (spec.mid_width if spec.mid_layer else 0))
        assert out.dtype == np.float32 and np.isfinite(out).all()


def test_every_registry_entry_names_a_keras_constructor_and_preprocessing():
    import keras

    assert len(backbones.keras_apps.TABLE) >= 30
    for spec in backbones.keras_apps.TABLE.values():
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

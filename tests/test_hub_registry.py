"""The backbone registry as data: keras_hub entries beside keras.applications ones, listed by
the CLI, without importing a framework."""

from __future__ import annotations

import subprocess
import sys

from transfer_ensemble import backbones, cli
from transfer_ensemble.config import ExtractConfig


def test_listing_shows_each_backbone_with_width_and_native_size(capsys):
    assert cli.main(["backbones"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["dinov2_large"][1:6] == ["keras_hub", "2048", "224", "14", "cls+mean"]
    assert lines["siglip2_so400m_patch14_384"][1:6] == ["keras_hub", "1152", "384", "14", "map"]
    assert lines["xception"][1:6] == ["keras.applications", "2048", "299", "1", "avg"]
    assert cli.main(["extract", "--data", "nowhere", "--run", "nowhere", "--backbones", "list"]) == 0
    assert "clip_vit_large_patch14" in capsys.readouterr().out


def test_hub_and_keras_applications_names_mix_and_do_not_clash():
    assert backbones.parse_backbones("xception, DINOv2-Large,efficientnet_b0_ra_imagenet") == \
        ("xception", "dinov2_large", "efficientnet_b0_ra_imagenet")
    assert backbones.get_spec("efficientnet_b0").builder == "keras.applications"
    assert backbones.get_spec("efficientnet_b0_ra_imagenet").builder == "keras_hub"


def test_a_vit_size_is_rounded_to_its_patch_multiple_and_others_are_not():
    config = ExtractConfig(backbones=("xception", "dinov2_small"), image_size=75, weights="random")
    assert [config.size_of(backbones.get_spec(n), 1.5) for n in ("xception", "dinov2_small")] == [112, 112]
    assert [config.size_of(backbones.get_spec(n)) for n in ("xception", "dinov2_small")] == [75, 70]
    assert ExtractConfig(backbones=("dinov2_small",), weights="random").size_of(backbones.get_spec("dinov2_small"),
                                                                               1.5) == 336


def test_preprocessing_is_data_and_keras_applications_records_are_unchanged():
    assert backbones.settings(backbones.get_spec("xception")) == {
        "preprocess": "opencv-imdecode-rgb;area-or-linear-resize;keras-preprocess_input-in-graph;flip=lr"}
    hub = backbones.settings(backbones.get_spec("clip_vit_large_patch14"))
    assert hub["pooling"] == "cls" and "mean=[0.48145466, 0.4578275, 0.40821073]" in hub["preprocess"]


def test_the_registry_and_cli_import_no_framework():
    code = ("import sys; from transfer_ensemble import backbones, cli; backbones.listing(); "
            "print(sorted(m for m in ('keras', 'keras_hub', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

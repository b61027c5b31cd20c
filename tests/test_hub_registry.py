"""The backbone registry as data: keras_hub entries beside keras.applications ones, listed by
the CLI, without importing a framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transfer_ensemble import backbones, cli
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError


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


def test_dinov3_and_metaclip_2_entries_say_their_size_patch_width_and_pooling(capsys):
    assert cli.main(["backbones"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["dinov3_vit_small_lvd1689m"][1:6] == ["keras_hub", "768", "224", "16", "cls+mean"]
    assert lines["dinov3_vit_large_lvd1689m"][1:6] == ["keras_hub", "2048", "224", "16", "cls+mean"]
    assert lines["dinov3_vit_7b_lvd1689m"][1:6] == ["keras_hub", "8192", "224", "16", "cls+mean"]
    assert lines["metaclip_2_vit_huge_patch14_378"][1:6] == ["keras_hub", "1280", "378", "14", "cls"]
    assert lines["metaclip_2_vit_giant_patch14_224"][1:6] == ["keras_hub", "1664", "224", "14", "cls"]
    config = ExtractConfig(backbones=("dinov3_vit_small_lvd1689m",), image_size=75, weights="random")
    assert config.size_of(backbones.get_spec("dinov3_vit_small_lvd1689m")) == 80  # 75 / 16 = 4.7 patches -> 5
    assert ExtractConfig(backbones=("dinov3_vit_base_lvd1689m",), weights="random").size_of(
        backbones.get_spec("dinov3_vit_base_lvd1689m"), 2) == 448


def test_dinov3_satellite_models_keep_their_own_normalisation():
    satellite = backbones.settings(backbones.get_spec("dinov3_vit_large_sat493m"))["preprocess"]
    web = backbones.settings(backbones.get_spec("dinov3_vit_large_lvd1689m"))["preprocess"]
    assert "mean=[0.43, 0.411, 0.296]" in satellite and "std=[0.229, 0.224, 0.225]" in web


def _keras_preset(folder, class_name: str, config: dict):
    """A preset folder as save_to_preset writes it, its weights an empty (but whole) HDF5 file: enough
    for everything read before a model is built."""
    import json

    import h5py

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"module": "keras_hub.src.models", "class_name": class_name,
                                                    "config": config, "registered_name": f"keras_hub>{class_name}"}))
    h5py.File(folder / "model.weights.h5", "w").close()
    return folder


DINOV3_S_PLUS = dict(patch_size=16, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
                     num_register_tokens=4, use_gated_mlp=True, image_shape=[224, 224, 3])


def test_a_dinov3_small_plus_saved_as_the_small_one_is_refused(tmp_path):
    preset = _keras_preset(tmp_path / "dinov3_vit_small_lvd1689m", "DINOV3Backbone", DINOV3_S_PLUS)
    spec = backbones.get_spec("dinov3_vit_small_lvd1689m")
    with pytest.raises(UserError) as info:
        backbones.bind(spec, backbones.resolve_weights(spec, str(tmp_path)))
    assert f"{preset} holds dinov3_vit_small_plus_lvd1689m" in str(info.value)
    plus = backbones.get_spec("dinov3_vit_small_plus_lvd1689m")
    (tmp_path / "dinov3_vit_small_lvd1689m").rename(tmp_path / plus.name)
    assert backbones.bind(plus, backbones.resolve_weights(plus, str(tmp_path))).arch == plus.arch


def test_a_metaclip_2_vision_tower_saved_alone_is_refused_for_its_missing_post_norm(tmp_path):
    name = "metaclip_2_vit_huge_patch14_224"
    preset = _keras_preset(tmp_path / name, "MetaCLIP2VisionEncoder", dict(
        patch_size=14, hidden_dim=1280, num_layers=32, num_heads=16, intermediate_dim=5120, image_shape=[224, 224, 3]))
    spec = backbones.get_spec(name)
    with pytest.raises(UserError) as info:
        backbones.bind(spec, backbones.resolve_weights(spec, str(tmp_path)))
    message = str(info.value)
    assert f"{preset} holds a MetaCLIP2VisionEncoder alone" in message and "vision_post_layer_norm" in message
    assert "save_to_preset" in message

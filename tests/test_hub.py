"""keras_hub backbones (DINOv2, CLIP and SigLIP vision towers, EfficientNet) beside a
keras.applications one: tiny random configurations saved with ``save_to_preset``, read with
``--weights DIR`` as an offline machine would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import FAST_TRAIN, kill_part_way, make_kaggle, run_cli
from test_feature_cache import features, ids, store
from transfer_ensemble import backbones
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.features import Extractor
from transfer_ensemble.runfolder import RunFolder

pytestmark = pytest.mark.slow  # every test builds a model or runs the CLI in a subprocess

APPS, SIZE = "mobilenet_v3_small", 56
HUB = ("dinov2_small", "clip_vit_large_patch14", "efficientnet_b0_ra_imagenet")
TINY_VIT = dict(patch_size=14, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
                image_shape=(56, 56, 3))


def save_tiny_presets(folder: Path) -> Path:
    """Tiny random DINOv2 (with 2 registers), CLIP and SigLIP vision towers and EfficientNet,
    saved under their registry names as ``Backbone.save_to_preset`` writes them, and a random
    MobileNetV3Small .h5 (the cheapest keras.applications model) under Keras's published name."""
    import keras
    import keras_hub
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(7)
    models = keras_hub.models
    models.DINOV2Backbone(**TINY_VIT, num_register_tokens=2, position_embedding_shape=(56, 56, 3)) \
        .save_to_preset(str(folder / "dinov2_small"))
    models.CLIPVisionEncoder(**TINY_VIT).save_to_preset(str(folder / "clip_vit_large_patch14"))
    models.SigLIPVisionEncoder(**TINY_VIT).save_to_preset(str(folder / "siglip2_so400m_patch14_384"))
    models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1], stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16], stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"], width_coefficient=1.0, depth_coefficient=1.0, min_depth=None,
        use_depth_divisor_as_min_depth=True, cap_round_filter_decrease=True,
    ).save_to_preset(str(folder / "efficientnet_b0_ra_imagenet"))
    mobilenet = keras.applications.MobileNetV3Small(include_top=False, pooling="avg", weights=None,
                                                    input_shape=(SIZE, SIZE, 3))
    with h5py.File(folder / backbones.get_spec(APPS).weights_file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, mobilenet)
    return folder


@pytest.fixture(scope="session")
def presets(tmp_path_factory) -> Path:
    return save_tiny_presets(tmp_path_factory.mktemp("presets"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_kaggle(tmp_path_factory.mktemp("hubdata") / "data", per_class=3, n_test=3)


def test_saved_presets_hold_only_what_save_to_preset_writes(presets):
    assert sorted(p.name for p in (presets / "dinov2_small").iterdir()) == \
        ["config.json", "metadata.json", "model.weights.h5"]


def test_run_mixes_hub_and_keras_applications_backbones_at_two_scales_and_predict_equals_submit(
        presets, data, tmp_path):
    run, sub = tmp_path / "run", tmp_path / "sub.csv"
    names = ",".join((APPS,) + HUB)
    result = run_cli("run", "--data", str(data), "--run", str(run), "--out", str(sub), "--weights", str(presets),
                     "--backbones", names, "--image-size", "60", "--scales", "1,1.5", "--batch-size", "8",
                     *FAST_TRAIN)
    assert result.returncode == 0, result.stderr
    folder = RunFolder(run)

    def meta(source: str) -> dict:
        return json.loads(folder.store("train", source).meta.read_text())

    # A ViT's size is rounded to its patch multiple (60 -> 56, 90 -> 84); the others are not.
    assert [meta(f"dinov2_small{s}")["image_size"] for s in ("", "@1.5x")] == [56, 84]
    assert [meta(f"{APPS}{s}")["image_size"] for s in ("", "@1.5x")] == [60, 90]
    assert meta("dinov2_small")["pooling"] == "cls+mean" and meta("dinov2_small")["width"] == 32
    assert meta("clip_vit_large_patch14")["pooling"] == "cls" and meta("clip_vit_large_patch14")["width"] == 16
    assert meta("efficientnet_b0_ra_imagenet")["pooling"] == "avg"
    assert "std=[0.229, 0.224, 0.225]" in meta("dinov2_small")["preprocess"]
    assert meta(APPS)["preprocess"] == \
        "opencv-imdecode-rgb;area-or-linear-resize;keras-preprocess_input-in-graph;flip=lr"
    assert "pooling" not in meta(APPS)
    for name in HUB:
        views = features(run, "train", f"{name}@1.5x")
        assert views["original"].shape[0] == 9 and np.isfinite(views["original"]).all()
        assert not np.allclose(views["original"], views["flipped"]), name

    out = tmp_path / "preds.csv"
    predicted = run_cli("predict", "--run", str(run), "--images", str(data / "test"), "--out", str(out))
    assert predicted.returncode == 0, predicted.stderr
    got = pd.read_csv(out)
    got = got.assign(image=[Path(p).stem for p in got["image"]]).set_index("image").sort_index()
    want = pd.read_csv(sub).set_index("id").sort_index()
    np.testing.assert_allclose(got[want.columns].to_numpy(), want.to_numpy(), rtol=0, atol=1e-6)


def test_siglip_vision_tower_pools_with_its_own_head_at_any_patch_multiple(presets):
    config = ExtractConfig(backbones=("siglip2_so400m_patch14_384",), weights=str(presets), image_size=56,
                           scales=(1, 1.5))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 84, 84, 3), dtype=np.uint8)
    extractor = Extractor(config, 1.5)
    spec = extractor.specs[0]
    assert (spec.width, spec.pooling, extractor.size(spec)) == (16, "map", 84)
    views = extractor.forward(spec, pixels)
    assert views["original"].shape == (2, 16) and np.isfinite(views["original"]).all()


DINOV2_ONLY = ["--backbones", "dinov2_small", "--image-size", str(SIZE), "--scales", "1", "--batch-size", "2"]


def extract(data: Path, run: Path, presets: Path, backend: str = "tensorflow") -> subprocess.CompletedProcess:
    result = run_cli("extract", "--data", str(data), "--run", str(run), "--weights", str(presets), *DINOV2_ONLY,
                     env={"KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def dinov2_run(presets, data, tmp_path_factory) -> Path:
    """The tiny DINOv2's features of the data set, extracted on TensorFlow in one go."""
    run = tmp_path_factory.mktemp("dinov2") / "run"
    extract(data, run, presets)
    return run


def test_the_same_tiny_dinov2_gives_the_same_features_on_tensorflow_and_jax(presets, data, dinov2_run, tmp_path):
    run = tmp_path / "run"
    extract(data, run, presets, backend="jax")
    for split in ("train", "test"):
        for view, a in features(dinov2_run, split, "dinov2_small").items():
            b = features(run, split, "dinov2_small")[view]
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert cosine.min() >= 0.9999, (split, view, cosine)


def test_killed_hub_extraction_resumes_to_identical_features(presets, data, dinov2_run, tmp_path):
    run = tmp_path / "run"
    kill_part_way(["extract", "--data", str(data), "--run", str(run), "--weights", str(presets), *DINOV2_ONLY],
                  store(run, "train", "dinov2_small").done)
    resumed = extract(data, run, presets)
    assert "reusing cached features" in resumed.stderr, resumed.stderr
    for split in ("train", "test"):
        assert ids(run, split, "dinov2_small") == ids(dinov2_run, split, "dinov2_small")
        got, want = features(run, split, "dinov2_small"), features(dinov2_run, split, "dinov2_small")
        for view in want:
            assert np.array_equal(got[view], want[view]), (split, view)


def test_offline_message_names_the_preset_and_how_to_fetch_it(monkeypatch):
    import keras_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    extractor = Extractor(ExtractConfig(backbones=("dinov2_large",), weights="imagenet"))
    assert extractor.sources["dinov2_large"].identity == "keras_hub:dinov2_large"
    with pytest.raises(backbones.WeightsUnavailableError) as info:
        extractor.ensure_weights_known()
    message = str(info.value)
    assert "keras_hub preset dinov2_large" in message and "api.kaggle.com" in message
    assert "Backbone.from_preset('dinov2_large').save_to_preset('WEIGHTS_DIR/dinov2_large')" in message
    assert "--weights WEIGHTS_DIR" in message


def test_offline_with_xception_and_a_preset_each_paragraph_names_its_own_cause(monkeypatch, tmp_path):
    import keras
    import keras_hub

    def no_xception(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/xception.h5")

    def no_preset(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached Xception file
    monkeypatch.setattr(keras.applications, "Xception", no_xception)
    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", no_preset)
    extractor = Extractor(ExtractConfig(backbones=("xception", "dinov2_small"), weights="imagenet"))
    with pytest.raises(backbones.WeightsUnavailableError) as info:
        extractor.ensure_weights_known()
    message = str(info.value)
    apps, hub = message.split("Could not fetch the keras_hub preset")
    assert "xception.h5" in apps and "api.kaggle.com" not in apps
    assert "dinov2_small" in hub and "api.kaggle.com" in hub and "xception.h5" not in hub
    assert "--backbones" not in message  # no backbone has its weights

    cache = tmp_path / "models"
    cache.mkdir()
    (cache / backbones.get_spec("xception").weights_file).write_bytes(b"cached xception weights")
    extractor = Extractor(ExtractConfig(backbones=("xception", "dinov2_small"), weights="imagenet"))
    with pytest.raises(backbones.WeightsUnavailableError) as info:
        extractor.ensure_weights_known()
    message = str(info.value)
    assert message.startswith("Could not fetch the keras_hub preset dinov2_small") and "api.kaggle.com" in message
    assert message.endswith("with the backbones whose weights are there: --backbones xception.")


def test_a_wrong_weights_folder_is_a_clear_error(presets, data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), "--weights", str(empty),
                     "--backbones", "dinov2_small")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no keras_hub preset dinov2_small" in result.stderr and "save_to_preset" in result.stderr

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "dinov2_small").symlink_to(presets / "clip_vit_large_patch14")
    with pytest.raises(UserError, match="holds a CLIPVisionEncoder, not the DINOV2Backbone"):
        Extractor(ExtractConfig(backbones=("dinov2_small",), weights=str(mixed)))


def _copy_preset(presets: Path, folder: Path, name: str = "dinov2_small", saved_as: str | None = None) -> Path:
    """A copy of one tiny preset in a weights folder of its own (under `saved_as`, default its name)."""
    import shutil

    shutil.copytree(presets / name, folder / (saved_as or name))
    return folder / (saved_as or name)


def _edit_config(preset: Path, **changes) -> None:
    saved = json.loads((preset / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del saved["config"][key]
        else:
            saved["config"][key] = value
    (preset / "config.json").write_text(json.dumps(saved))


def _no_hidden_dim(preset: Path) -> None:
    _edit_config(preset, hidden_dim=None)


def _patch_size_in_words(preset: Path) -> None:
    _edit_config(preset, patch_size="fourteen")


def _converter_without_config(preset: Path) -> None:
    (preset / "image_converter.json").write_text(json.dumps({"class_name": "DINOV2ImageConverter"}))


def _converter_not_json(preset: Path) -> None:
    (preset / "image_converter.json").write_text("{'scale': 0.5,")


def _converter_scale_in_words(preset: Path) -> None:
    (preset / "image_converter.json").write_text(json.dumps({"config": {"scale": "1/255"}}))


def _weights_not_hdf5(preset: Path) -> None:
    (preset / "model.weights.h5").write_bytes(b"\x00" * 4096)


def _weights_cut_short(preset: Path) -> None:
    data = (preset / "model.weights.h5").read_bytes()
    (preset / "model.weights.h5").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, file, words", [
    (_no_hidden_dim, "config.json", "has no hidden_dim"),
    (_patch_size_in_words, "config.json", "gives patch_size as 'fourteen'"),
    (_converter_without_config, "image_converter.json", "has no 'config' entry"),
    (_converter_not_json, "image_converter.json", "is not JSON"),
    (_converter_scale_in_words, "image_converter.json", "'1/255' is neither a number nor 3 numbers"),
    (_weights_not_hdf5, "model.weights.h5", "not a readable weights file"),
    (_weights_cut_short, "model.weights.h5", "not a readable weights file"),
])
def test_a_damaged_preset_folder_is_one_paragraph_naming_the_file_and_the_fix(presets, tmp_path, damage, file,
                                                                              words):
    preset = _copy_preset(presets, tmp_path / "weights")
    damage(preset)
    with pytest.raises(UserError) as info:
        Extractor(ExtractConfig(backbones=("dinov2_small",), weights=str(tmp_path / "weights")))
    message = str(info.value)
    assert str(preset / file) in message and words in message, message
    assert "save_to_preset" in message and "\n" not in message


def test_a_corrupt_preset_is_refused_by_the_cli_leaving_no_run_folder(presets, data, tmp_path):
    preset = _copy_preset(presets, tmp_path / "weights")
    _weights_cut_short(preset)
    run = tmp_path / "run"
    result = run_cli("extract", "--data", str(data), "--run", str(run), "--weights", str(tmp_path / "weights"),
                     *DINOV2_ONLY)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(preset / "model.weights.h5") in result.stderr
    assert not run.exists()


def test_a_preset_keras_hub_cannot_load_is_one_paragraph(presets, data, tmp_path):
    preset = _copy_preset(presets, tmp_path / "weights")
    _edit_config(preset, hidden_dim=32, intermediate_dim=64)  # the weights are of hidden_dim 16
    result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), "--weights",
                     str(tmp_path / "weights"), *DINOV2_ONLY)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot load the preset {preset}" in result.stderr and "save_to_preset" in result.stderr


def test_an_efficientnet_preset_saved_at_a_fixed_input_shape_runs_at_every_scale(tmp_path):
    import keras
    import keras_hub

    keras.utils.set_random_seed(3)
    keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3], stackwise_num_repeats=[1], stackwise_input_filters=[8],
        stackwise_output_filters=[8], stackwise_expansion_ratios=[1], stackwise_squeeze_and_excite_ratios=[0.25],
        stackwise_strides=[2], stackwise_block_types=["v1"], width_coefficient=1.0, depth_coefficient=1.0,
        min_depth=None, use_depth_divisor_as_min_depth=True, cap_round_filter_decrease=True, input_shape=(64, 64, 3),
    ).save_to_preset(str(tmp_path / "efficientnet_b0_ra_imagenet"))
    config = ExtractConfig(backbones=("efficientnet_b0_ra_imagenet",), weights=str(tmp_path), scales=(1, 2))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    extractor = Extractor(config, 2.0)
    spec = extractor.specs[0]
    assert extractor.size(spec) == 128
    at_128 = extractor.forward(spec, pixels)["original"]
    at_64 = Extractor(config, 1.0).forward(spec, pixels[:, ::2, ::2])["original"]
    assert at_128.shape == at_64.shape == (2, spec.width) and np.isfinite(at_128).all()


def test_another_published_backbone_saved_under_a_registry_name_is_refused(presets, tmp_path):
    preset = _copy_preset(presets, tmp_path / "weights", saved_as="dinov2_large")
    _edit_config(preset, hidden_dim=384, num_layers=12, num_heads=6, intermediate_dim=1536, num_register_tokens=0)
    with pytest.raises(UserError) as info:
        Extractor(ExtractConfig(backbones=("dinov2_large",), weights=str(tmp_path / "weights")))
    message = str(info.value)
    assert f"{preset} holds dinov2_small" in message and "not dinov2_large" in message
    assert "--backbones dinov2_small" in message


def test_a_preset_of_no_published_architecture_is_recorded_as_what_it_is(presets, tmp_path, caplog):
    preset = _copy_preset(presets, tmp_path / "weights", saved_as="dinov2_large")
    extractor = Extractor(ExtractConfig(backbones=("dinov2_large",), weights=str(tmp_path / "weights")))
    spec = extractor.specs[0]
    assert spec.width == 32  # its own hidden_dim 16, class token and patch mean: not dinov2_large's 2048
    recorded = backbones.settings(spec)["architecture"]
    assert recorded == {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "intermediate_dim": 32, "patch_size": 14,
                        "num_register_tokens": 2}
    assert f"{preset} is not the published dinov2_large" in caplog.text
    assert "architecture" not in backbones.settings(backbones.get_spec("dinov2_large"))

"""DINOv3 and MetaCLIP 2 beside Xception, and --weights folders in each format keras_hub reads: tiny
random configurations saved with ``save_to_preset``, and a tiny DINOv3 written as a Hugging Face
snapshot (config.json with model_type + model.safetensors) holding the same weights, as an offline
competition notebook attaches one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_TRAIN, kill_part_way, make_kaggle, run_cli
from test_feature_cache import features, ids
from transfer_ensemble import backbones, cli
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.features import Extractor
from transfer_ensemble.runfolder import RunFolder

DINOV3, METACLIP = "dinov3_vit_small_lvd1689m", "metaclip_2_vit_huge_patch14_224"
TINY_DINOV3 = dict(patch_size=16, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
                   num_register_tokens=2, image_shape=(64, 64, 3))
# The config.json of the same tiny model as transformers writes it (the keys keras_hub's converter reads).
HF_DINOV3 = {"model_type": "dinov3_vit", "architectures": ["DINOv3ViTModel"], "image_size": 64, "patch_size": 16,
             "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
             "layerscale_value": 1.0, "num_register_tokens": 2, "hidden_act": "gelu", "use_gated_mlp": False,
             "query_bias": True, "key_bias": True, "value_bias": True, "proj_bias": True, "mlp_bias": True,
             "attention_dropout": 0.0, "drop_path_rate": 0.0, "layer_norm_eps": 1e-5, "rope_theta": 100.0}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format by hand: an 8-byte header length, the JSON header, the float32 data."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def hf_tensors(model, converter=None, config: dict | None = None) -> dict[str, np.ndarray]:
    """`model`'s weights under the names and layouts of its Hugging Face (or timm) checkpoint:
    keras_hub's own converter (default: DINOv3's) is run with a loader that records, for each weight
    it would read, the tensor that its layout hook turns into the Keras value (a transposed kernel,
    a channels-first convolution kernel)."""
    import keras
    from keras_hub.src.utils.transformers import convert_dinov3

    def undone(value: np.ndarray, hook) -> np.ndarray:
        candidates = [value, value.T]
        if value.ndim == 4:  # PyTorch's (out, in, h, w), or a depthwise kernel's (channels, 1, h, w)
            candidates += [np.transpose(value, (3, 2, 0, 1)), np.transpose(value, (2, 3, 0, 1))]
        for candidate in candidates:
            try:
                if np.array_equal(hook(candidate, list(value.shape)), value):
                    return candidate
            except (AssertionError, ValueError):
                continue
        raise AssertionError(f"no layout of a {value.shape} weight gives it back through {hook}")

    class Recorder:
        def __init__(self) -> None:
            self.tensors: dict[str, np.ndarray] = {}

        def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
            value = keras.ops.convert_to_numpy(keras_variable)
            self.tensors[hf_weight_key] = undone(value, hook_fn or (lambda x, _: x))

    recorder = Recorder()
    (converter or convert_dinov3).convert_weights(model, recorder, HF_DINOV3 if config is None else config)
    return recorder.tensors


def tiny_dinov3(seed: int = 11):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.DINOV3Backbone(**TINY_DINOV3)


def save_snapshot(model, folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(HF_DINOV3))
    write_safetensors(folder / "model.safetensors", hf_tensors(model))
    return folder


def save_tiny_metaclip_2(folder: Path) -> Path:
    """A whole tiny MetaCLIP 2 (vision and text towers), as the published presets are saved."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(12)
    models = keras_hub.models
    models.MetaCLIP2Backbone(
        vision_encoder=models.MetaCLIP2VisionEncoder(patch_size=14, hidden_dim=16, num_layers=1, num_heads=2,
                                                     intermediate_dim=32, image_shape=(56, 56, 3)),
        text_encoder=models.MetaCLIP2TextEncoder(vocabulary_size=32, embedding_dim=16, hidden_dim=16, num_layers=1,
                                                 num_heads=2, intermediate_dim=32, max_sequence_length=8),
        projection_dim=8).save_to_preset(str(folder))
    return folder


def save_random_xception(folder: Path) -> None:
    """A random Xception .h5 under Keras's published name (the weights of ``--weights random``)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(0)
    model = keras.applications.Xception(include_top=False, pooling="avg", weights=None, input_shape=(72, 72, 3))
    with h5py.File(folder / backbones.get_spec("xception").weights_file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """`presets`: the tiny DINOv3 and MetaCLIP 2 saved with save_to_preset; `snapshot`: the same DINOv3
    as a Hugging Face snapshot; `mixed`: a random Xception .h5, that snapshot and the MetaCLIP 2 preset."""
    base = tmp_path_factory.mktemp("weights")
    model = tiny_dinov3()
    model.save_to_preset(str(base / "presets" / DINOV3))
    save_tiny_metaclip_2(base / "presets" / METACLIP)
    save_snapshot(model, base / "snapshot" / DINOV3)
    (base / "mixed").mkdir()
    save_random_xception(base / "mixed")
    shutil.copytree(base / "snapshot" / DINOV3, base / "mixed" / DINOV3)
    (base / "mixed" / METACLIP).symlink_to(base / "presets" / METACLIP)
    return {name: base / name for name in ("presets", "snapshot", "mixed")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_kaggle(tmp_path_factory.mktemp("snapdata") / "data", per_class=3, n_test=3)


@pytest.mark.slow
@pytest.mark.backend  # keras_hub's DINOv3 (rotary position embeddings) and its converter on each backend
def test_a_snapshot_gives_the_features_of_the_same_weights_saved_as_a_preset(folders):
    pytest.importorskip("safetensors", reason="keras_hub reads a snapshot's weights with the safetensors package")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    out = {}
    for kind in ("presets", "snapshot"):
        extractor = Extractor(ExtractConfig(backbones=(DINOV3,), weights=str(folders[kind]), image_size=64,
                                            scales=(1,)))
        spec, source = extractor.specs[0], extractor.sources[DINOV3]
        assert (spec.width, spec.pooling, extractor.size(spec)) == (32, "cls+mean", 64)
        assert source.format == ("keras" if kind == "presets" else "transformers")
        out[kind] = extractor.forward(spec, pixels)
        assert source.identity.startswith("sha256:" if kind == "presets" else "transformers:sha256:")
    for view in out["presets"]:
        np.testing.assert_allclose(out["snapshot"][view], out["presets"][view], rtol=1e-5, atol=1e-5)
        assert np.isfinite(out["presets"][view]).all()


@pytest.mark.slow
def test_dinov3_pools_its_class_token_and_the_mean_of_its_patch_tokens_without_the_registers(folders):
    import keras
    import keras_hub

    extractor = Extractor(ExtractConfig(backbones=(DINOV3,), weights=str(folders["presets"]), image_size=64,
                                        scales=(1,)))
    spec = extractor.specs[0]
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = extractor.forward(spec, pixels, ["original"])["original"]
    model = keras_hub.models.Backbone.from_preset(str(folders["presets"] / DINOV3))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    tokens = keras.ops.convert_to_numpy(model({"pixel_values": (pixels / 255 - mean) / std}))
    assert tokens.shape == (2, 1 + 2 + 16, 16)  # class token, 2 registers, 4 x 4 patches
    np.testing.assert_allclose(got, np.concatenate([tokens[:, 0], tokens[:, 3:].mean(1)], axis=1), atol=1e-4)
    assert not np.allclose(got[:, 16:], tokens[:, 1:].mean(1), atol=1e-3)  # the registers would change it


@pytest.mark.slow
def test_run_mixes_xception_a_snapshot_and_a_preset_at_two_scales_with_crops_and_predict_equals_submit(
        folders, data, tmp_path):
    pytest.importorskip("safetensors", reason="keras_hub reads a snapshot's weights with the safetensors package")
    run, sub = tmp_path / "run", tmp_path / "sub.csv"
    assert cli.main(["run", "--data", str(data), "--run", str(run), "--out", str(sub), "--weights",
                     str(folders["mixed"]), "--backbones", f"xception,{DINOV3},{METACLIP}", "--image-size", "72",
                     "--scales", "1,1.5", "--views", "center_pair", "--batch-size", "8", *FAST_TRAIN]) == 0
    folder = RunFolder(run)

    def meta(source: str) -> dict:
        return json.loads(folder.store("train", source).meta.read_text())

    # Sizes round to each ViT's patch (72 -> 64 for /16, 70 for /14; 108 -> 112 for both); Xception's do not.
    assert [meta(f"{DINOV3}{s}")["image_size"] for s in ("", "@1.5x")] == [64, 112]
    assert [meta(f"{METACLIP}{s}")["image_size"] for s in ("", "@1.5x")] == [70, 112]
    assert [meta(f"xception{s}")["image_size"] for s in ("", "@1.5x")] == [72, 108]
    assert meta(DINOV3)["weights"].startswith("transformers:sha256:") and meta(DINOV3)["pooling"] == "cls+mean"
    assert meta(METACLIP)["weights"].startswith("sha256:") and meta(METACLIP)["pooling"] == "cls"
    assert (meta(DINOV3)["width"], meta(METACLIP)["width"]) == (32, 16)
    assert "mean=[0.48145466, 0.4578275, 0.40821073]" in meta(METACLIP)["preprocess"]
    for name, width in ((DINOV3, 32), (METACLIP, 16)):
        views = features(run, "train", f"{name}@1.5x")
        assert views["original"].shape == (9, width) and np.isfinite(views["original"]).all()
        assert not np.allclose(views["original"], views["flipped"]), name
        crops = {view: np.load(folder.store("train", f"{name}@1.5x").view(view))
                 for view in ("center", "center_flipped")}
        assert crops["center_flipped"].shape == (9, width) and not np.allclose(views["original"], crops["center"])

    out = tmp_path / "preds.csv"
    assert cli.main(["predict", "--run", str(run), "--images", str(data / "test"), "--out", str(out)]) == 0
    got = pd.read_csv(out)
    got = got.assign(image=[Path(p).stem for p in got["image"]]).set_index("image").sort_index()
    want = pd.read_csv(sub).set_index("id").sort_index()
    np.testing.assert_allclose(got[want.columns].to_numpy(), want.to_numpy(), rtol=0, atol=1e-6)


def dinov3_alone(data: Path, weights: Path, batch_size: int = 8) -> list[str]:
    """`extract` options for the tiny DINOv3 alone, from `weights`, at 64 px and one scale."""
    return ["--data", str(data), "--weights", str(weights), "--backbones", DINOV3, "--image-size", "64",
            "--scales", "1", "--batch-size", str(batch_size)]


@pytest.mark.slow
def test_a_changed_snapshot_weights_file_makes_its_stores_stale(folders, data, tmp_path):
    pytest.importorskip("safetensors", reason="keras_hub reads a snapshot's weights with the safetensors package")
    weights, run = tmp_path / "weights", tmp_path / "run"
    shutil.copytree(folders["snapshot"], weights)
    args = ["extract", "--run", str(run), *dinov3_alone(data, weights)]
    assert cli.main(args) == 0
    before = json.loads(RunFolder(run).store("train", DINOV3).meta.read_text())["weights"]
    first = features(run, "train", DINOV3)

    tensors = hf_tensors(tiny_dinov3())
    tensors["norm.weight"] = tensors["norm.weight"] * 2  # the final layer norm's scale: every feature changes
    write_safetensors(weights / DINOV3 / "model.safetensors", tensors)
    assert cli.main(args) == 0
    after = json.loads(RunFolder(run).store("train", DINOV3).meta.read_text())["weights"]
    assert before != after and after.startswith("transformers:sha256:")
    second = features(run, "train", DINOV3)
    for view in first:
        np.testing.assert_allclose(second[view], 2 * first[view], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_dinov3_snapshot_gives_the_same_features_on_tensorflow_and_jax(folders, data, tmp_path):
    pytest.importorskip("safetensors", reason="keras_hub reads a snapshot's weights with the safetensors package")
    args = dinov3_alone(data, folders["snapshot"])
    assert cli.main(["extract", "--run", str(tmp_path / "tf"), *args]) == 0
    result = run_cli("extract", "--run", str(tmp_path / "jax"), *args, env={"KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr
    for split in ("train", "test"):
        for view, a in features(tmp_path / "tf", split, DINOV3).items():
            b = features(tmp_path / "jax", split, DINOV3)[view]
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert cosine.min() >= 0.9999, (split, view, cosine)


@pytest.mark.slow
def test_a_killed_dinov3_snapshot_extraction_resumes_to_identical_features(folders, data, tmp_path):
    pytest.importorskip("safetensors", reason="keras_hub reads a snapshot's weights with the safetensors package")
    args = dinov3_alone(data, folders["snapshot"], batch_size=2)  # several batches, to be killed between
    assert cli.main(["extract", "--run", str(tmp_path / "whole"), *args]) == 0
    run = tmp_path / "killed"
    kill_part_way(["extract", "--run", str(run), *args], RunFolder(run).store("train", DINOV3).done)
    assert cli.main(["extract", "--run", str(run), *args]) == 0
    for split in ("train", "test"):
        assert ids(run, split, DINOV3) == ids(tmp_path / "whole", split, DINOV3)
        want = features(tmp_path / "whole", split, DINOV3)
        for view, got in features(run, split, DINOV3).items():
            assert np.array_equal(got, want[view]), (split, view)


@pytest.mark.slow
def test_random_dinov3_is_the_published_architecture_pooled_by_class_token_and_patch_mean():
    extractor = Extractor(ExtractConfig(backbones=(DINOV3,), weights="random", image_size=32, scales=(1,)))
    spec = extractor.specs[0]
    model = extractor.model(spec).model
    assert model.output.shape[-1] == spec.width == 768 and extractor.size(spec) == 32
    assert 21e6 < sum(int(np.prod(w.shape)) for w in model.weights) < 22.5e6  # ViT-S/16: 21.6 M parameters
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    views = extractor.forward(spec, pixels)
    assert views["original"].shape == (2, 768) and np.isfinite(views["original"]).all()


def tiny_snapshot(folder: Path, config: dict | None = None) -> Path:
    """A snapshot folder of the tiny DINOv3's config and some float32 tensors (no framework needed)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(HF_DINOV3 if config is None else config))
    write_safetensors(folder / "model.safetensors", {"norm.weight": np.ones(16), "norm.bias": np.zeros(16)})
    return folder


def _no_safetensors(preset: Path) -> None:
    (preset / "model.safetensors").rename(preset / "pytorch_model.bin")


def _another_model_type(preset: Path) -> None:
    (preset / "config.json").write_text(json.dumps({**HF_DINOV3, "model_type": "dinov2"}))


def _not_a_vision_model(preset: Path) -> None:
    (preset / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))


def _cut_short(preset: Path) -> None:
    data = (preset / "model.safetensors").read_bytes()
    (preset / "model.safetensors").write_bytes(data[:len(data) - 20])


def _header_only_half_there(preset: Path) -> None:
    (preset / "model.safetensors").write_bytes((10_000).to_bytes(8, "little") + b'{"norm.weight": ')


def _no_format(preset: Path) -> None:
    (preset / "config.json").write_text(json.dumps({"hidden_size": 16}))


def _no_hidden_size(preset: Path) -> None:
    (preset / "config.json").write_text(json.dumps({k: v for k, v in HF_DINOV3.items() if k != "hidden_size"}))


@pytest.mark.parametrize("damage, words", [
    (_no_safetensors, "has no model.safetensors (it holds config.json, pytorch_model.bin)"),
    (_another_model_type, "with model_type 'dinov2', not one of dinov3_vit_small_lvd1689m, whose model_type is "
                          "'dinov3_vit'"),
    (_not_a_vision_model, "with model_type 'bert'"),
    (_cut_short, "is cut short"),
    (_header_only_half_there, "not a readable safetensors file"),
    (_no_format, "names no format keras_hub reads"),
    (_no_hidden_size, "has no hidden_size, which keras_hub's converter reads"),
])
def test_a_snapshot_keras_hub_cannot_convert_is_one_paragraph_naming_the_folder_and_what_works(tmp_path, damage,
                                                                                              words):
    preset = tiny_snapshot(tmp_path / "weights" / DINOV3)
    damage(preset)
    with pytest.raises(UserError) as info:
        backbones.resolve_weights(backbones.get_spec(DINOV3), str(tmp_path / "weights"))
    message = str(info.value)
    assert str(preset) in message and words in message, message
    assert "save_to_preset" in message and "\n" not in message


def test_a_snapshot_of_a_family_keras_hub_converts_none_of_says_to_save_a_preset(tmp_path):
    preset = tiny_snapshot(tmp_path / "weights" / "clip_vit_large_patch14", {"model_type": "clip"})
    with pytest.raises(UserError) as info:
        backbones.resolve_weights(backbones.get_spec("clip_vit_large_patch14"), str(tmp_path / "weights"))
    message = str(info.value)
    assert f"{preset / 'config.json'} is a Hugging Face snapshot (model_type 'clip')" in message
    assert "keras_hub converts no Hugging Face snapshot into the CLIPVisionEncoder" in message
    assert "save_to_preset('WEIGHTS_DIR/clip_vit_large_patch14')" not in message  # names the real folder


def test_a_snapshot_without_the_safetensors_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    tiny_snapshot(tmp_path / "weights" / DINOV3)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors"
                        else find_spec(name, *a))
    with pytest.raises(UserError, match="needs the safetensors package, which is not installed: pip install "
                                        "safetensors"):
        backbones.resolve_weights(backbones.get_spec(DINOV3), str(tmp_path / "weights"))


@pytest.fixture
def safetensors_installed(monkeypatch):
    """The safetensors package as found, for checks that read json alone (the package reads weights)."""
    import importlib.machinery
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "safetensors" else find_spec(name, *a))


def test_a_snapshot_identity_is_its_format_and_a_digest_of_its_files(tmp_path, safetensors_installed):
    preset = tiny_snapshot(tmp_path / "weights" / DINOV3)
    spec = backbones.get_spec(DINOV3)
    first = backbones.resolve_weights(spec, str(tmp_path / "weights"))
    assert (first.kind, first.format, first.path) == ("file", "transformers", preset)
    assert backbones.resolve_weights(spec, str(tmp_path / "weights")).identity == first.identity
    write_safetensors(preset / "model.safetensors", {"norm.weight": np.full(16, 2.0), "norm.bias": np.zeros(16)})
    second = backbones.resolve_weights(spec, str(tmp_path / "weights"))
    assert first.identity.startswith("transformers:sha256:") and second.identity != first.identity


@pytest.mark.slow
def test_a_bad_snapshot_stops_the_cli_with_exit_2_and_leaves_no_run_folder(data, tmp_path, capsys):
    preset = tiny_snapshot(tmp_path / "weights" / DINOV3)
    _cut_short(preset)
    run = tmp_path / "run"
    assert cli.main(["extract", "--data", str(data), "--run", str(run), "--weights", str(tmp_path / "weights"),
                     "--backbones", DINOV3, "--image-size", "64", "--scales", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{preset / 'model.safetensors'} is cut short" in err and "Traceback" not in err
    assert not run.exists()


def test_a_snapshot_of_another_registry_entry_is_refused_like_a_preset(tmp_path, safetensors_installed):
    s_plus = {**HF_DINOV3, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
              "intermediate_size": 1536, "num_register_tokens": 4, "use_gated_mlp": True, "hidden_act": "silu"}
    preset = tiny_snapshot(tmp_path / DINOV3, s_plus)
    spec = backbones.get_spec(DINOV3)
    with pytest.raises(UserError, match=f"{preset} holds dinov3_vit_small_plus_lvd1689m"):
        backbones.bind(spec, backbones.resolve_weights(spec, str(tmp_path)))


def test_a_snapshot_runs_at_the_entry_size_with_the_normalisation_it_states(tmp_path, safetensors_installed):
    preset = tiny_snapshot(tmp_path / DINOV3, {**HF_DINOV3, "image_size": 518})
    spec = backbones.get_spec(DINOV3)
    bound = backbones.bind(spec, backbones.resolve_weights(spec, str(tmp_path)))
    assert (bound.size, bound.width, bound.size_multiple) == (224, 32, 16)
    assert bound.preprocessing == spec.preprocessing  # no preprocessor_config.json: the published one
    (preset / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "rescale_factor": 1 / 255}))
    bound = backbones.bind(spec, backbones.resolve_weights(spec, str(tmp_path)))
    assert (bound.preprocessing.mean, bound.preprocessing.std) == ((0.5,) * 3, (0.25,) * 3)
    assert "mean=[0.5, 0.5, 0.5]" in backbones.settings(bound)["preprocess"]


def test_a_timm_folder_is_read_for_a_family_keras_hub_converts_from_timm(tmp_path, safetensors_installed):
    name = "efficientnet_b0_ra_imagenet"
    timm = {"architecture": "efficientnet_b0", "num_classes": 1000, "num_features": 1280,
            "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225]}}
    tiny_snapshot(tmp_path / "weights" / name, timm)
    spec = backbones.get_spec(name)
    source = backbones.resolve_weights(spec, str(tmp_path / "weights"))
    assert source.format == "timm" and source.identity.startswith("timm:sha256:")
    assert backbones.bind(spec, source).width == 1280
    with pytest.raises(UserError, match="timm folder with architecture 'resnet50', not one of "
                                        "efficientnet_b0_ra_imagenet, whose architecture is 'efficientnet'"):
        tiny_snapshot(tmp_path / "other" / name, {**timm, "architecture": "resnet50"})
        backbones.resolve_weights(spec, str(tmp_path / "other"))
    with pytest.raises(UserError, match="keras_hub converts no timm folder into the DINOV3Backbone"):
        tiny_snapshot(tmp_path / "vit" / DINOV3, {"architecture": "vit_small_patch16_dinov3"})
        backbones.resolve_weights(backbones.get_spec(DINOV3), str(tmp_path / "vit"))


TIMM_B0 = {"architecture": "efficientnet_b0", "num_classes": 1000, "num_features": 1280,
           "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                              "std": [0.229, 0.224, 0.225]}}


@pytest.mark.slow
def test_a_timm_efficientnet_folder_gives_the_features_of_its_weights(tmp_path):
    pytest.importorskip("safetensors", reason="keras_hub reads a timm folder's weights with the safetensors package")
    import keras
    import keras_hub
    from keras_hub.src.utils.timm import convert_efficientnet

    keras.utils.set_random_seed(13)
    model = keras_hub.models.EfficientNetBackbone(**convert_efficientnet.convert_backbone_config(TIMM_B0))
    name = "efficientnet_b0_ra_imagenet"
    preset = tmp_path / name
    preset.mkdir()
    (preset / "config.json").write_text(json.dumps(TIMM_B0))
    write_safetensors(preset / "model.safetensors", hf_tensors(model, convert_efficientnet, TIMM_B0))

    extractor = Extractor(ExtractConfig(backbones=(name,), weights=str(tmp_path), image_size=64, scales=(1,)))
    spec = extractor.specs[0]
    assert (extractor.sources[name].format, spec.width, spec.pooling) == ("timm", 1280, "avg")
    pixels = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = extractor.forward(spec, pixels, ["original"])["original"]
    mean, std = np.array(TIMM_B0["pretrained_cfg"]["mean"]), np.array(TIMM_B0["pretrained_cfg"]["std"])
    want = keras.ops.convert_to_numpy(model((pixels / 255 - mean) / std)).mean(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_snapshot_whose_weights_do_not_fit_its_config_is_one_paragraph_when_built(tmp_path):
    pytest.importorskip("safetensors", reason="keras_hub reads a snapshot's weights with the safetensors package")
    preset = tiny_snapshot(tmp_path / DINOV3)  # a whole file, but of two tensors only
    extractor = Extractor(ExtractConfig(backbones=(DINOV3,), weights=str(tmp_path), image_size=64, scales=(1,)))
    with pytest.raises(UserError) as info:
        extractor.model(extractor.specs[0])
    message = str(info.value)
    assert f"cannot load the Hugging Face snapshot {preset}" in message and "model.safetensors" in message
    assert "\n" not in message and "save_to_preset" in message

"""Option defaults and validation in transfer_ensemble.config: fast, no models, no subprocesses."""

from __future__ import annotations

import math

import pytest

from transfer_ensemble import backbones
from transfer_ensemble.config import (
    LinearOptions,
    BAD_IMAGE_POLICIES, MAX_FOLDS, MAX_SEED, PRECISIONS, ExtractConfig, SeedOptions, TrainConfig, merged, upgrade,
)
from transfer_ensemble.errors import UserError

SOURCE = "runs/x/config.json"

BAD_EXTRACT = [
    ("image_size", 10, "--image-size"),
    ("image_size", -5, "--image-size"),
    ("image_size", "75", "--image-size"),
    ("image_size", [75], "--image-size"),
    ("image_size", 75.0, "--image-size"),
    ("image_size", True, "--image-size"),
    ("batch_size", 0, "--batch-size"),
    ("batch_size", 2.5, "--batch-size"),
    ("batch_size", None, "--batch-size"),
    ("seed", "abc", "--seed"),
    ("seed", -1, "--seed"),
    ("seed", 99999999999999999999, "--seed"),
    ("seed", 5000000, "--seed"),
    ("backbones", 5, "--backbones"),
    ("backbones", "nope", "--backbones"),
    ("backbones", ["xception", 3], "--backbones"),
    ("precision", "float16", "--precision"),
    ("on_bad_image", "ignore", "--on-bad-image"),
    ("weights", "", "--weights"),
    ("weights", 3, "--weights"),
]

BAD_TRAIN = [
    ("folds", "3", "--folds"),
    ("folds", 1, "--folds"),
    ("folds", MAX_FOLDS + 1, "--folds"),
    ("seed", -1, "--seed"),
    ("seed", MAX_SEED + 1, "--seed"),
    ("head", "mlp", "--head"),
    ("epochs", 0, "--epochs"),
    ("epochs", 3.0, "--epochs"),
    ("patience", 0, "--patience"),
    ("dropout", 1.5, "--dropout"),
    ("dropout", 1, "--dropout"),
    ("dropout", -0.1, "--dropout"),
    ("dropout", "0.5", "--dropout"),
    ("dropout", math.nan, "--dropout"),
    ("batch_size", 0, "--head-batch-size"),
    ("learning_rate", "fast", "--learning-rate"),
    ("learning_rate", math.nan, "--learning-rate"),
    ("learning_rate", math.inf, "--learning-rate"),
    ("learning_rate", -1, "--learning-rate"),
    ("learning_rate", 0, "--learning-rate"),
    ("learning_rate", 1e30, "--learning-rate"),
    ("learning_rate", False, "--learning-rate"),
]


def _refusal(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("cls, key, value, flag",
                         [(ExtractConfig, *case) for case in BAD_EXTRACT]
                         + [(TrainConfig, *case) for case in BAD_TRAIN])
def test_bad_value_names_flag_value_and_source(cls, key, value, flag):
    message = _refusal(lambda: cls.from_json({key: value}, SOURCE))
    assert flag in message
    assert repr(value) in message
    assert SOURCE in message


@pytest.mark.parametrize("key, value, flag", [(k, v, f) for k, v, f in BAD_EXTRACT if k != "backbones"])
def test_bad_extract_value_refused_when_built_directly(key, value, flag):
    message = _refusal(lambda: ExtractConfig(**{key: value}))
    assert flag in message and repr(value) in message
    assert "config.json" not in message


@pytest.mark.parametrize("key, value, flag", BAD_TRAIN)
def test_bad_train_value_refused_when_built_directly(key, value, flag):
    target = TrainConfig if key in ("folds", "seed", "head") else SeedOptions
    message = _refusal(lambda: target(**{key: value}))
    assert flag in message and repr(value) in message
    assert "config.json" not in message


def test_messages_say_why():
    assert "32 bits" in _refusal(lambda: TrainConfig.from_json({"seed": MAX_SEED + 1}, SOURCE))
    assert "1e-4 to 1e-2" in _refusal(lambda: TrainConfig.from_json({"head": "seed", "learning_rate": 1e30}, SOURCE))
    text = _refusal(lambda: TrainConfig.from_json({"epochs": 3}, SOURCE))
    assert "--epochs 3" in text and "option of --head seed, not of --head linear" in text and SOURCE in text
    text = _refusal(lambda: TrainConfig.from_json({"tta": "yes"}, SOURCE))
    assert "--tta 'yes'" in text and "true or false" in text
    text = _refusal(lambda: ExtractConfig.from_json({"image_size": "75"}, SOURCE))
    assert "whole number" in text and "a string" in text
    text = _refusal(lambda: ExtractConfig.from_json({"image_size": 10}, SOURCE))
    assert "below xception's minimum input size of 71 px" in text
    assert "--precision" in _refusal(lambda: ExtractConfig.from_json({"precision": "fp16"}, SOURCE))


@pytest.mark.parametrize("cls", [ExtractConfig, TrainConfig])
def test_defaults_round_trip(cls):
    assert cls.from_json(cls().to_json()) == cls()
    assert cls.from_json({}) == cls()


def test_a_run_recorded_before_the_middle_layer_has_none():
    assert ExtractConfig().mid_layer is True
    assert ExtractConfig.from_json(upgrade({"extract": {"scales": [1.0, 2.0]}})["extract"]).mid_layer is False
    assert ExtractConfig.from_json(upgrade({"extract": {"mid_layer": True}})["extract"]).mid_layer is True
    assert ExtractConfig().mid_of(backbones.get_spec("xception"))
    assert not ExtractConfig().mid_of(backbones.get_spec("dinov2_small"))
    assert not ExtractConfig(mid_layer=False).mid_of(backbones.get_spec("xception"))


def test_json_shapes():
    extract = ExtractConfig().to_json()
    assert extract["backbones"] == list(backbones.DEFAULT_BACKBONES)
    assert extract["image_size"] is None
    recipe = {"folds", "seed", "head", "multiscale", "select_blocks", "pool_views", "tta", "temperature"}
    assert set(TrainConfig(head="seed").to_json()) == recipe | {"epochs", "patience", "dropout", "batch_size",
                                                                "learning_rate"}
    assert set(TrainConfig(head="linear").to_json()) == recipe | {"power"}


def test_each_head_has_its_own_view_and_calibration_defaults():
    seed = TrainConfig(head="seed")
    assert (seed.multiscale, seed.pool_views, seed.tta, seed.temperature) == (False,) * 4, "the paper's recipe"
    linear = TrainConfig(head="linear")
    assert (linear.multiscale, linear.pool_views, linear.tta, linear.temperature) == (True,) * 4
    assert TrainConfig(head="seed", tta=True).tta and not TrainConfig(head="linear", tta=False).tta
    assert linear.select_blocks and not seed.select_blocks, "blocks are chosen by OOF for the linear head only"


def test_non_default_configs_round_trip():
    extract = ExtractConfig(backbones=("mobilenet_v2", "xception"), weights="/tmp/weights", image_size=96,
                            batch_size=4, precision=PRECISIONS[1], seed=7, on_bad_image=BAD_IMAGE_POLICIES[1])
    assert ExtractConfig.from_json(extract.to_json(), SOURCE) == extract
    train = TrainConfig(head="seed", folds=3, seed=11, options=SeedOptions(epochs=4, patience=2, dropout=0.0,
                                                              batch_size=16, learning_rate=0.01))
    assert TrainConfig.from_json(train.to_json(), SOURCE) == train


def test_from_json_ignores_unknown_keys_and_defaults_head():
    train = TrainConfig.from_json({"folds": 3, "seed": 1, "power": False, "other_section": {"x": 1}})
    assert train == TrainConfig(folds=3, seed=1, head="linear", options=LinearOptions(power=False))


def test_backbones_from_string_or_list():
    by_text = ExtractConfig.from_json({"backbones": "Xception, inception-v3"})
    by_list = ExtractConfig.from_json({"backbones": ["xception", "inception_v3"]})
    assert by_text.backbones == by_list.backbones == ("xception", "inception_v3")
    assert ExtractConfig(backbones=["mobilenet_v2"]).backbones == ("mobilenet_v2",)


def test_merged_prefers_flag_then_saved_then_default():
    saved = {"head": "seed", "folds": 3, "epochs": 7, "learning_rate": 0.01, "unrelated": "kept out"}
    train = merged(TrainConfig, saved, {"folds": 4, "epochs": None, "seed": None}, SOURCE)
    assert train == TrainConfig(head="seed", folds=4, seed=0, options=SeedOptions(epochs=7, learning_rate=0.01))
    extract = merged(ExtractConfig, None, {"batch_size": 8, "image_size": None})
    assert extract == ExtractConfig(batch_size=8)


def test_merged_says_where_a_bad_value_came_from():
    from_file = _refusal(lambda: merged(TrainConfig, {"head": "seed", "epochs": 0}, {"folds": 3}, SOURCE))
    assert "--epochs" in from_file and SOURCE in from_file
    from_flag = _refusal(lambda: merged(TrainConfig, {"head": "seed", "epochs": 3}, {"folds": 1}, SOURCE))
    assert "--folds" in from_flag and "command line" in from_flag and SOURCE not in from_flag


def test_largest_seed_and_folds_give_32_bit_fold_seeds():
    train = TrainConfig(folds=MAX_FOLDS, seed=MAX_SEED)
    largest = max(train.seed * 1000 + view * 100 + fold for view in range(10) for fold in range(train.folds))
    assert largest < 2**32


def test_image_size_limits_follow_the_backbones():
    assert ExtractConfig.from_json({"image_size": None}).image_size is None
    spec = backbones.get_spec("xception")
    assert ExtractConfig().size_of(spec) == spec.size
    assert ExtractConfig(image_size=80).size_of(spec) == 80
    assert ExtractConfig.from_json({"backbones": ["mobilenet_v2"], "image_size": 32}).image_size == 32
    with pytest.raises(UserError, match="xception's minimum input size of 71"):
        ExtractConfig.from_json({"backbones": ["xception"], "image_size": 70}, SOURCE)
    assert ExtractConfig.from_json({"backbones": ["xception"], "image_size": 71}).image_size == 71
    with pytest.raises(UserError, match="inception_v3's minimum input size of 75"):
        ExtractConfig(image_size=71)


def test_section_must_be_an_object():
    assert SOURCE in _refusal(lambda: TrainConfig.from_json([1, 2], SOURCE))


def test_a_weights_folder_is_recorded_absolute_as_data_is(tmp_path, monkeypatch):
    """--weights DIR typed relative means the same folder from any directory later (predict)."""
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    typed = merged(ExtractConfig, None, {"weights": "weights"})
    assert typed.weights == str(tmp_path.resolve() / "weights")
    assert ExtractConfig.from_json(typed.to_json()).weights == typed.weights
    assert ExtractConfig(weights="./weights/").weights == typed.weights
    assert ExtractConfig(weights="imagenet").weights == "imagenet"
    assert ExtractConfig(weights="random").weights == "random"
    assert ExtractConfig(weights="missing").weights == "missing", "no folder: refused later, naming it as typed"

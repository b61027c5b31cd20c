"""The middle layer (--mid-layer): its features are the backbone's own layer, average-pooled, in
the same pass; the final features stay what they were; the paper's head never sees it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folders, run_cli
from transfer_ensemble import backbones, features, workflow
from transfer_ensemble.blocks import blocks_for
from transfer_ensemble.config import ExtractConfig, TrainConfig
from transfer_ensemble.runfolder import RunFolder


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("xception", 71), ("inception_v3", 75)])
def test_the_middle_layer_is_the_backbones_own_layer_pooled_beside_unchanged_final_features(name, size):
    """Both views, a batch shorter than the compiled one: the first `width` columns are bit for bit
    the features without the middle layer (so the paper's recipe is untouched); the rest are the
    global average of `mid_layer`'s output, computed directly."""
    import keras

    spec = backbones.get_spec(name)
    config = ExtractConfig(backbones=(name,), weights="random", image_size=size, batch_size=4)
    pixels = np.random.default_rng(5).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    wide = features.Extractor(config).forward(spec, pixels)
    narrow = features.Extractor(replace(config, mid_layer=False))
    final = narrow.forward(spec, pixels)
    model = narrow.model(spec).model
    layer = keras.Model(model.input, model.get_layer(spec.mid_layer).output)
    preprocess = backbones.preprocess_input(spec)
    for view, mirror in (("original", False), ("flipped", True)):
        assert wide[view].shape == (3, spec.width + spec.mid_width)
        np.testing.assert_array_equal(wide[view][:, :spec.width], final[view], err_msg=view)
        image = pixels[:, :, ::-1] if mirror else pixels
        direct = np.asarray(layer(preprocess(image.astype(np.float32)), training=False)).mean(axis=(1, 2))
        got = wide[view][:, spec.width:]
        np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max(), err_msg=view)
    assert not np.allclose(wide["original"][:, spec.width:], wide["flipped"][:, spec.width:], rtol=1e-3, atol=0)


@pytest.mark.slow
def test_the_default_head_trains_on_the_middle_layer_and_the_seed_head_does_not(tmp_path):
    data = make_folders(tmp_path / "data", n_classes=2, per_class=3, n_valid=0, n_test=2)
    run = tmp_path / "run"
    workflow.extract(data, run, ExtractConfig(backbones=("xception",), weights="random", image_size=71,
                                              scales=(1.0, 1.5)))
    folder = RunFolder(run)
    for split in ("train", "test"):
        meta = json.loads(folder.store(split, "xception.mid@1.5x").meta.read_text())
        assert (meta["width"], meta["layer"]) == (728, "block13_sepconv1_act")
        assert json.loads(folder.store(split, "xception").meta.read_text())["width"] == 2048
    def sources(run: Path, config: TrainConfig) -> tuple[str, ...]:
        return blocks_for(RunFolder(run).extract_config(), config).sources

    assert sources(run, TrainConfig()) == ("xception", "xception.mid", "xception@1.5x", "xception.mid@1.5x")
    assert sources(run, TrainConfig(head="seed")) == ("xception",)
    assert sources(run, TrainConfig(multiscale=False)) == ("xception", "xception.mid")

    saved = json.loads(folder.config_path.read_text())
    del saved["extract"]["mid_layer"]  # a run extracted before the middle layer was recorded
    folder.config_path.write_text(json.dumps(saved))
    assert sources(run, TrainConfig()) == ("xception", "xception@1.5x")


@pytest.mark.slow
def test_run_config_of_a_run_recorded_before_the_middle_layer_repeats_it(tmp_path):
    """An old config.json (no mid_layer) means the same to `run --config` as to extract, train and
    predict (`config.upgrade`): no middle layer is extracted, the submission is the old recipe's."""
    data = make_folders(tmp_path / "data", n_classes=2, per_class=3, n_valid=0, n_test=2)
    run = tmp_path / "run"
    workflow.extract(data, run, ExtractConfig(backbones=("xception",), weights="random", image_size=71,
                                              scales=(1.0,), mid_layer=False))
    saved = json.loads((run / "config.json").read_text())
    del saved["extract"]["mid_layer"]
    (run / "config.json").write_text(json.dumps(saved))
    result = run_cli("run", "--config", str(run / "config.json"), "--out", str(tmp_path / "sub.csv"), "--folds", "2")
    assert result.returncode == 0, result.stderr
    assert not (run / "features" / "train" / "xception.mid").exists()
    assert json.loads((run / "config.json").read_text())["extract"]["mid_layer"] is False
    assert "all features were already computed" in result.stdout

"""Feature blocks chosen by OOF (selection.py): the signal kept, the noise left out, the choice
recorded in the recipe and used by submit and predict alike, and the default train's candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from transfer_ensemble import cli, selection, workflow
from transfer_ensemble.config import TrainConfig
from transfer_ensemble.predict import predict_to_csv
from transfer_ensemble.recipes import list_recipes
from transfer_ensemble.runfolder import RunFolder

from conftest import make_kaggle

VIEWS = ("original", "flipped")


def _synthetic(n_per_class: int = 60, classes: int = 3, seed: int = 0) -> tuple[dict, np.ndarray]:
    """A block whose class means differ (the signal) and a wider block of pure noise, in two views."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    means = rng.normal(0, 1.0, (classes, 16))
    features = {"signal": {}, "noise": {}}
    for view in VIEWS:
        features["signal"][view] = (means[labels] + rng.normal(0, 1.2, (len(labels), 16))).astype(np.float32)
        features["noise"][view] = rng.normal(0, 1.0, (len(labels), 64)).astype(np.float32)
    return features, labels


@pytest.mark.parametrize("order", [("noise", "signal"), ("signal", "noise")])
def test_the_signal_block_is_kept_and_the_noise_block_left_out(order):
    features, labels = _synthetic()
    config = TrainConfig(head="linear", folds=3)
    chosen = selection.select(config, features, order, VIEWS, labels, 3)
    assert chosen.chosen == ("signal",)
    assert chosen.path[0][0] == "signal"
    assert all(fold == ("signal",) for fold in chosen.fold_choices)
    assert np.isfinite(chosen.nested_log_loss) and chosen.nested_log_loss < np.log(3) / 2
    again = selection.Selection.from_json(chosen.to_json())
    assert again == chosen and "left out: noise" in chosen.describe()


def test_greedy_stops_when_a_block_gains_less_than_min_gain():
    losses = {("a",): 0.50, ("b",): 0.60, ("a", "b"): 0.50 * (1 - selection.MIN_GAIN / 2),
              ("c",): 0.70, ("a", "c"): 0.40, ("a", "b", "c"): 0.399, ("b", "c"): 0.55}
    chosen, path = selection.greedy(lambda s: losses[s], ("a", "b", "c"))
    assert chosen == ("a", "c") and [p[0] for p in path] == ["a", "c"]  # b's 0.001 share is not worth it


def test_the_nested_check_runs_with_few_images_per_class():
    features, labels = _synthetic(n_per_class=4)
    chosen = selection.select(TrainConfig(head="linear", folds=2), features, ("noise", "signal"), VIEWS, labels, 3)
    assert len(chosen.fold_choices) == selection.FOLDS and np.isfinite(chosen.nested_log_loss)


def test_sample_rows_is_stratified_and_fixed_by_the_seed():
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])
    rows = selection.sample_rows(labels, 200, 0)
    assert len(rows) == pytest.approx(200, abs=4)
    assert np.array_equal(rows, selection.sample_rows(labels, 200, 0))
    assert np.bincount(labels[rows]).tolist() == pytest.approx([100, 60, 30, 10], abs=1)


@pytest.fixture(scope="module")
def two_scale_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("selection")
    data = make_kaggle(base / "data", per_class=12, n_test=12)
    run = base / "run"
    workflow.extract(data, run, {"weights": "random", "image_size": 75, "batch_size": 16, "scales": "1,2",
                                 "backbones": "xception"})
    return data, run


def test_a_recipe_records_its_chosen_blocks_and_predict_scores_with_them(two_scale_run, tmp_path, monkeypatch):
    data, run = two_scale_run
    result = workflow.train(run, {"head": "linear", "folds": 2})
    recipe = next(r for r in list_recipes(RunFolder(run)) if r.name == result.recipe)
    chosen = selection.Selection.from_json(recipe.inputs["selection"])
    assert set(chosen.candidates) == {"xception", "xception.mid", "xception@2x", "xception.mid@2x"}
    assert recipe.blocks.sources == chosen.chosen == tuple(recipe.inputs["features"])
    sub = workflow.submit(run, tmp_path / "sub.csv")
    predicted = predict_to_csv(run, data / "test", tmp_path / "pred.csv")
    assert predicted.recipe == sub.recipe == result.recipe
    expected = pd.read_csv(sub.submission).set_index("id")
    got = pd.read_csv(predicted.out)
    got.index = got["image"].str.rsplit(".", n=1).str[0]
    np.testing.assert_allclose(got.loc[expected.index, expected.columns].to_numpy(), expected.to_numpy(), atol=1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("the recorded selection should have been reused")

    monkeypatch.setattr(selection, "select", refuse)
    assert workflow.train(run, {"head": "linear", "folds": 2}).recipe == result.recipe


def test_no_select_blocks_trains_on_every_block(two_scale_run):
    _, run = two_scale_run
    result = workflow.train(run, {"head": "linear", "folds": 2, "select_blocks": False})
    assert result.recipe == "linear-folds2-no_select_blocks"
    recipe = next(r for r in list_recipes(RunFolder(run)) if r.name == result.recipe)
    assert len(recipe.blocks.sources) == 4 and "selection" not in recipe.inputs


def test_named_blocks_make_per_block_recipes_that_blend(two_scale_run, tmp_path):
    data, run = two_scale_run
    one = workflow.train(run, {"head": "linear", "folds": 2, "blocks": "xception"})
    two = workflow.train(run, {"head": "linear", "folds": 2, "blocks": ["xception@2x", "xception.mid@2x"]})
    assert one.recipe == "linear-folds2-blocks_xception"
    assert two.recipe == "linear-folds2-blocks_xception.mid@2x+xception@2x"  # in the run's column order
    recipes = {r.name: r for r in list_recipes(RunFolder(run))}
    assert recipes[one.recipe].blocks.sources == ("xception",) and "selection" not in recipes[one.recipe].inputs
    assert recipes[two.recipe].blocks.sources == ("xception@2x", "xception.mid@2x")
    mixed = workflow.blend(run, [one.recipe, two.recipe])
    assert mixed.recipe == f"blend-{one.recipe}+{two.recipe}"
    sub = workflow.submit(run, tmp_path / "sub.csv", heads=mixed.recipe)
    predicted = predict_to_csv(run, data / "test", tmp_path / "pred.csv", heads_name=mixed.recipe)
    expected = pd.read_csv(sub.submission).set_index("id")
    got = pd.read_csv(predicted.out)
    got.index = got["image"].str.rsplit(".", n=1).str[0]
    np.testing.assert_allclose(got.loc[expected.index, expected.columns].to_numpy(), expected.to_numpy(), atol=1e-6)


def test_a_block_the_run_lacks_is_one_paragraph_naming_the_run_s_blocks(two_scale_run, capsys):
    _, run = two_scale_run
    assert cli.main(["train", "--run", str(run), "--head", "linear", "--blocks", "xception@3x"]) == 2
    err = capsys.readouterr().err
    assert "xception@3x is not extracted in this run, which has xception, xception.mid, xception@2x, " \
           "xception.mid@2x" in err and "Traceback" not in err
    assert cli.main(["train", "--run", str(run), "--head", "linear", "--blocks", "xception/../x"]) == 2
    assert "--blocks 'xception/../x' (given on the command line) must be a comma-separated list" in capsys.readouterr().err

"""Plug-ins registered from Python are first-class in the run folder (issue 26): a recipe of a
plug-in head is used or refused, never swapped for another; registered names are safe file
names; a store's views registered elsewhere are kept; a view's transform is part of its
features' identity; and a recipe owns the feature blocks it was trained on, so extracting other
views never stales or deletes it.

The plug-ins are a user's module (tests/plugins/example_plugins.py), imported here and named to
the CLI, in a subprocess, as a user would.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_kaggle, run_cli
from transfer_ensemble import backbones, engines, heads, plugins, views, workflow
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.heads.sklearn import sklearn_head
from transfer_ensemble.options import Rule, option
from transfer_ensemble.recipes import recipe_statuses, select_recipe
from transfer_ensemble.runfolder import RunFolder

PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"
MODULE = "example_plugins"
SMALL = dict(backbones=("mobilenet_v2",), weights="random", image_size=32, batch_size=8, scales=(1.0,))
SMALL_FLAGS = ["--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "32", "--batch-size", "8",
               "--scales", "1"]
WITH_VIEW = ("original", "flipped", "center_half")


def _importable() -> dict:
    """The environment of a CLI process that can import the plug-in module."""
    return {"PYTHONPATH": os.pathsep.join([str(PLUGINS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def example():
    """The plug-in module, imported (so its head, view and engine are registered) for this module's
    tests only: other test modules see the registries as the package ships them."""
    sys.path.insert(0, str(PLUGINS_DIR))
    module = importlib.import_module(MODULE)
    yield module
    heads.unregister("plugin_knn")
    views.unregister("center_half")
    engines.unregister("plugin_engine")
    sys.modules.pop(MODULE, None)
    sys.path.remove(str(PLUGINS_DIR))


@pytest.fixture(scope="module")
def plugin_run(example, tmp_path_factory):
    """A run extracted with the plug-in view by the plug-in engine, with a built-in recipe trained
    first and the plug-in head's recipe trained last, all from Python."""
    base = tmp_path_factory.mktemp("plugins")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=3)
    run = base / "run"
    log = base / "engine.log"
    os.environ[example.MARKER] = str(log)
    try:
        workflow.extract(data, run, ExtractConfig(**SMALL, views=WITH_VIEW),
                         engine=EngineConfig(engine="plugin_engine"))
    finally:
        del os.environ[example.MARKER]
    workflow.train(run, {"head": "linear", "folds": 2})
    workflow.train(run, {"head": "plugin_knn", "folds": 2})
    return data, run, base, log


def _feature_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "features").rglob("*.npy"))}


# Item 2: names.
@pytest.mark.parametrize("name", ["a/b", "../../../escaped", "Knn", "", "knn-2", "x" * 65, "1st"])
def test_every_registry_refuses_a_name_that_is_no_safe_file_name(name):
    with pytest.raises(ValueError, match="cannot name a head"):
        heads.register(sklearn_head(name, lambda: None))
    with pytest.raises(ValueError, match="cannot name a view"):
        views.register(views.View(name, 99))
    with pytest.raises(ValueError, match="cannot name an? engine"):
        engines.register(name, "x:y")
    with pytest.raises(ValueError, match="cannot name a backbone"):
        backbones.register(backbones.BackboneSpec(name, "keras_apps", 224, 8, backbones.Preprocessing()))
    assert name not in heads.HEADS and name not in views.REGISTRY and name not in engines.ENGINES


def test_built_in_entries_cannot_be_unregistered_and_a_view_needs_a_free_seed_offset():
    for unregister, name in ((heads.unregister, "seed"), (views.unregister, "flipped"),
                             (engines.unregister, "local"), (backbones.unregister, "xception")):
        with pytest.raises(ValueError, match="built in"):
            unregister(name)
    with pytest.raises(ValueError, match="seed_offset 3 is taken"):
        views.register(views.View("center_again", 3, crop=views.Crop(0.5)))
    assert "center_again" not in views.REGISTRY


def test_a_registration_records_the_module_it_came_from_and_the_message_says_how_to_import_it(example):
    assert plugins.module_of("head", "plugin_knn") == MODULE
    assert plugins.module_of("view", "center_half") == MODULE
    assert plugins.module_of("engine", "plugin_engine") == MODULE
    assert plugins.module_of("head", "linear") is None
    said = plugins.missing_message("head", "knn", "my_plugins", "The head recipe 'knn-folds2' of runs/x")
    assert "--plugins my_plugins" in said and "not registered in this process" in said
    said = plugins.missing_message("head", "knn", plugins.SCRIPT, "The head recipe 'knn-folds2' of runs/x")
    assert "script or notebook" in said and "move the registration into a module" in said


def test_a_plugin_module_that_does_not_import_is_named_with_the_fix():
    with pytest.raises(UserError, match=r"'no_such_plugins' \(named by --plugins\) cannot be imported"):
        plugins.load(["no_such_plugins"], "--plugins")


# Item 1: a plug-in head's recipe is used, or refused with what to do; never another recipe.
@pytest.mark.slow
def test_submit_refuses_a_recipe_whose_plugin_head_is_not_importable_instead_of_submitting_another(plugin_run):
    data, run, base, _ = plugin_run
    out = base / "refused.csv"
    for command in (["submit", "--run", str(run), "--out", str(out)],
                    ["predict", "--run", str(run), "--images", str(data / "test"), "--out", str(out)],
                    ["train", "--run", str(run), "--heads", "plugin_knn-folds2-views_center_half"],
                    ["report", "--run", str(run)]):
        result = run_cli(*command)
        assert result.returncode == 2, result.stderr
        assert "'plugin_knn-folds2-views_center_half'" in result.stderr and "not registered" in result.stderr
        assert f"--plugins {MODULE}" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_runs_plugins_are_recorded_and_the_cli_uses_them_to_submit_predict_and_report(plugin_run, example):
    data, run, base, log = plugin_run
    config = json.loads((run / "config.json").read_text())
    assert config["plugins"] == {"view": {"center_half": MODULE}, "engine": {"plugin_engine": MODULE},
                                 "head": {"plugin_knn": MODULE}}
    name = "plugin_knn-folds2-views_center_half"
    recipe = json.loads((run / "heads" / name / "recipe.json").read_text())
    assert recipe["plugins"] == {"head": {"plugin_knn": MODULE}}
    assert log.read_text().splitlines() == ["extract train", "extract test"]

    sub = run_cli("--plugins", MODULE, "submit", "--run", str(run), "--out", str(base / "sub.csv"), env=_importable())
    assert sub.returncode == 0, sub.stderr
    assert f"head recipe {name}" in sub.stdout
    recorded = run_cli("submit", "--run", str(run), "--out", str(base / "sub2.csv"), env=_importable())
    assert recorded.returncode == 0, recorded.stderr  # the run's own record names the module
    assert (base / "sub.csv").read_bytes() == (base / "sub2.csv").read_bytes()

    pred = run_cli("predict", "--run", str(run), "--images", str(data / "test"), "--out", str(base / "pred.csv"),
                   "--engine", "plugin_engine", "--plugins", MODULE,
                   env={**_importable(), example.MARKER: str(base / "predict.log")})
    assert pred.returncode == 0, pred.stderr
    assert (base / "predict.log").read_text().splitlines() == ["extract predict", "score 3"]
    submission = pd.read_csv(base / "sub.csv").set_index("id")
    got = pd.read_csv(base / "pred.csv")
    got = got.set_index(got.columns[0]).rename(index=lambda p: Path(p).stem).loc[submission.index]
    np.testing.assert_allclose(got[submission.columns].to_numpy(), submission.to_numpy(), atol=1e-6)

    report = run_cli("report", "--run", str(run), env=_importable())
    assert report.returncode == 0, report.stderr
    assert name in (run / "report.html").read_text()


# Item 3: a store's views registered elsewhere are kept, and nothing is recomputed.
@pytest.mark.slow
def test_a_cli_extract_without_the_plugin_keeps_its_view_and_recomputes_nothing(plugin_run, tmp_path):
    data, run, _, _ = plugin_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = _feature_files(copy)
    assert "features/train/mobilenet_v2/center_half.npy" in before
    result = run_cli("extract", "--data", str(data), "--run", str(copy), *SMALL_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "center_half" in result.stderr and "not registered in this process" in result.stderr
    assert _feature_files(copy) == before
    for split in ("train", "test"):
        meta = json.loads((copy / "features" / split / "mobilenet_v2" / "meta.json").read_text())
        assert meta["views"] == list(WITH_VIEW)
    assert "all features were already computed" in result.stdout


# Item 4: a view's transform is part of the identity of its features.
@pytest.mark.slow
def test_a_view_whose_transform_changed_is_computed_again_and_its_recipes_go_stale(tmp_path, monkeypatch):
    data = make_kaggle(tmp_path / "data", n_classes=3, per_class=4, n_test=3)
    run = tmp_path / "run"
    workflow.extract(data, run, ExtractConfig(**SMALL, views=("original", "flipped", "center")))
    trained = workflow.train(run, {"head": "linear", "folds": 2}).recipe
    before = _feature_files(run)
    meta = json.loads((run / "features" / "train" / "mobilenet_v2" / "meta.json").read_text())
    assert meta["view_transforms"] == {"center": {"mirror": False, "crop": {"fraction": 0.875, "anchor": "center"}}}

    monkeypatch.setitem(views.REGISTRY, "center", views.View("center", 3, crop=views.Crop(0.5)))  # CROP changed
    workflow.extract(data, run, ExtractConfig(**SMALL, views=("original", "flipped", "center")))
    after = _feature_files(run)
    for split in ("train", "test"):
        folder = f"features/{split}/mobilenet_v2"
        assert after[f"{folder}/original.npy"] == before[f"{folder}/original.npy"]  # the pair is not recomputed
        assert after[f"{folder}/flipped.npy"] == before[f"{folder}/flipped.npy"]
        assert after[f"{folder}/center.npy"] != before[f"{folder}/center.npy"]
    states = {s.recipe.name: s.state for s in recipe_statuses(RunFolder(run))}
    assert states[trained] == "stale"


# Item 5: a recipe owns its blocks; extracting other views stales and deletes nothing.
@pytest.mark.slow
def test_adding_and_switching_views_keeps_every_recipe_current_side_by_side(tmp_path):
    data = make_kaggle(tmp_path / "data", n_classes=3, per_class=4, n_test=3)
    run = tmp_path / "run"
    folder = RunFolder(run)
    workflow.extract(data, run, ExtractConfig(**SMALL))
    pair = workflow.train(run, {"head": "linear", "folds": 2}).recipe
    assert pair == "linear-folds2"
    pair_sub = tmp_path / "pair.csv"
    workflow.submit(run, pair_sub)

    workflow.extract(data, run, ExtractConfig(**SMALL, views=("original", "flipped", "center")))
    assert {s.recipe.name: s.state for s in recipe_statuses(folder)} == {pair: "current"}
    again = tmp_path / "pair_again.csv"
    workflow.submit(run, again, heads=pair)
    assert again.read_bytes() == pair_sub.read_bytes()
    assert folder.kept_views() == {"views": ["original", "flipped", "center"]}  # a bare CLI extract keeps them

    crop = workflow.train(run, {"head": "linear", "folds": 2}).recipe
    assert crop == "linear-folds2-views_center"
    assert select_recipe(folder, crop).blocks.views == ("original", "flipped", "center")
    done = sorted((run / "heads" / pair).rglob("done.json"))
    stamps = [p.stat().st_mtime_ns for p in done]

    workflow.extract(data, run, ExtractConfig(**SMALL))  # back to the pair
    assert {s.recipe.name: s.state for s in recipe_statuses(folder)} == {pair: "current", crop: "current"}
    assert workflow.train(run, {"head": "linear", "folds": 2}).recipe == pair
    assert [p.stat().st_mtime_ns for p in done] == stamps, "the pair recipe's fold models were reused"
    assert (run / "heads" / crop / "metrics.json").exists()


@pytest.mark.slow
def test_a_plugin_head_view_and_engine_go_through_every_command_of_the_cli(example, tmp_path):
    """The whole workflow in CLI processes that import the user's module (--plugins): extract with
    the plug-in view on the plug-in engine, train the plug-in head, submit, predict = submit, report."""
    data = make_kaggle(tmp_path / "data", n_classes=3, per_class=4, n_test=3)
    run, env = tmp_path / "run", {**_importable(), example.MARKER: str(tmp_path / "engine.log")}
    steps = [["--plugins", MODULE, "extract", "--data", str(data), "--run", str(run), *SMALL_FLAGS,
              "--views", "pair,center_half", "--engine", "plugin_engine"],
             ["train", "--run", str(run), "--head", "plugin_knn", "--folds", "2", "--plugins", MODULE],
             ["submit", "--run", str(run), "--out", str(tmp_path / "sub.csv")],
             ["predict", "--run", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "pred.csv"),
              "--engine", "plugin_engine"],
             ["report", "--run", str(run)]]
    for step in steps:
        result = run_cli(*step, env=env)
        assert result.returncode == 0, (step, result.stderr)
    assert (tmp_path / "engine.log").read_text().splitlines() == ["extract train", "extract test", "extract predict",
                                                                  "score 3"]
    config = json.loads((run / "config.json").read_text())
    assert config["plugins"] == {"view": {"center_half": MODULE}, "engine": {"plugin_engine": MODULE},
                                 "head": {"plugin_knn": MODULE}}
    assert config["heads"] == "plugin_knn-folds2-views_center_half"
    submission = pd.read_csv(tmp_path / "sub.csv").set_index("id")
    got = pd.read_csv(tmp_path / "pred.csv")
    got = got.set_index(got.columns[0]).rename(index=lambda p: Path(p).stem).loc[submission.index]
    np.testing.assert_allclose(got[submission.columns].to_numpy(), submission.to_numpy(), atol=1e-6)
    page = (run / "report.html").read_text()
    assert "plugin_knn-folds2-views_center_half" in page
    assert f"head plugin_knn (from {MODULE})" in page and "original, flipped, center_half" in page


@dataclass(frozen=True)
class _MetricOptions:
    metric: str = option("euclidean", "--knn-metric", "distance", Rule("text", lambda c, k, v, _: v))


def test_a_head_option_value_cannot_move_a_recipe_folder_out_of_the_run(tmp_path):
    from transfer_ensemble.config import TrainConfig
    from transfer_ensemble.recipes import folder_name, recipe_name

    heads.register(sklearn_head("metric_knn", lambda metric: None, _MetricOptions))
    try:
        config = TrainConfig(head="metric_knn", options=_MetricOptions(metric="../../../escaped"))
        name = recipe_name(config)
        assert "../" in name  # the record keeps the name as the options make it
        heads_dir = tmp_path / "run" / "heads"
        folder = (heads_dir / folder_name(name)).resolve()
        assert folder.parent == heads_dir.resolve() and "/" not in folder_name(name)
        assert folder_name("linear-folds2") == "linear-folds2"
    finally:
        heads.unregister("metric_knn")

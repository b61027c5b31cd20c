"""The whole workflow through the CLI on generated images, as a competition entrant runs it."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_EXTRACT, make_kaggle, run_cli
from transfer_ensemble import backend, submission
from transfer_ensemble.dataset import load_dataset
from transfer_ensemble.recipes import select_recipe
from transfer_ensemble.runfolder import RunFolder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    run, out = base / "run", base / "submissions" / "sub.csv"
    result = run_cli("run", "--data", str(data), "--run", str(run), "--out", str(out), *FAST_EXTRACT,
                     "--head", "seed", "--folds", "2", "--epochs", "4", "--patience", "2", "--seed", "7")
    assert result.returncode == 0, result.stderr
    return data, run, out, result


@pytest.mark.slow
@pytest.mark.backend
def test_run_writes_every_artefact_with_the_right_shapes(finished_run):
    data, run, out, result = finished_run
    config = json.loads((run / "config.json").read_text())
    assert config["extract"]["backbones"] == ["xception", "inception_v3"]
    assert config["extract"]["image_size"] == 75 and config["train"]["folds"] == 2
    assert config["classes"] == ["class_2", "class_1", "class_0"]
    assert config["versions"]["keras"]
    assert config["backend"] == backend.name() == os.environ.get("KERAS_BACKEND", "tensorflow")

    folder = RunFolder(run)
    for split, n in (("train", 12), ("test", 5)):
        for backbone in ("xception", "inception_v3"):
            store = folder.store(split, backbone)
            meta = json.loads(store.meta.read_text())
            assert len(meta["ids"]) == n and meta["backend"] == backend.name()
            for view in ("original", "flipped"):
                features = np.load(store.view(view))
                assert features.shape == (n, 2048) and features.dtype == np.float32
                assert np.isfinite(features).all()
    assert json.loads(folder.store("test", "xception").meta.read_text())["ids"] == \
        ["te04", "te03", "te02", "te01", "te00"]

    recipe = select_recipe(folder)
    assert recipe.name == "seed-folds2-seed7-epochs4-patience2"
    assert recipe.folder == run / "heads" / recipe.name
    for view in ("original", "flipped"):
        assert np.load(recipe.oof(view)).shape == (12, 3)
        for fold in range(2):
            files = recipe.fold(view, fold)
            assert files.model(".keras").stat().st_size > 0
            test_pred = np.load(files.test_pred)
            assert test_pred.shape == (5, 3)
            np.testing.assert_allclose(test_pred.sum(axis=1), 1, atol=1e-5)

    metrics = json.loads(recipe.metrics_path.read_text())["oof"]
    assert {(r["view"], r["fold"]) for r in metrics["per_fold"]} == {(v, f) for v in ("original", "flipped")
                                                                    for f in range(2)}
    assert set(metrics["per_view"]) == {"original", "flipped"}
    assert 0 <= metrics["ensemble"]["accuracy"] <= 1 and metrics["ensemble"]["log_loss"] > 0
    assert "ensemble" in result.stdout and "log loss" in result.stdout
    assert "validation images" in result.stdout.splitlines()[result.stdout.splitlines().index(
        f"head recipe {recipe.name}:") + 1]
    assert f"The heads of recipe {recipe.name} learned almost nothing" in result.stderr  # random weights
    assert "learned almost nothing" in (run / "report.html").read_text()
    assert "building xception (random weights) at 75 px" in result.stderr
    assert "absl" not in result.stderr and "I0000" not in result.stderr and "oneDNN" not in result.stderr


@pytest.mark.slow
@pytest.mark.backend
def test_submission_is_valid_and_is_the_average_of_the_ten_models(finished_run):
    data, run, out, _ = finished_run
    dataset = load_dataset(data)
    frame = pd.read_csv(out, dtype={"id": str})
    submission.validate(frame, [it.id for it in dataset.test], dataset.classes)
    recipe = select_recipe(RunFolder(run))
    preds = [np.load(recipe.fold(v, k).test_pred) for v in ("original", "flipped") for k in range(2)]
    np.testing.assert_allclose(frame[dataset.classes].to_numpy(), np.mean(preds, axis=0), atol=1e-6)


@pytest.mark.slow
@pytest.mark.backend
def test_submit_alone_rewrites_the_same_submission(finished_run, tmp_path):
    _, run, out, _ = finished_run
    again = tmp_path / "again.csv"
    result = run_cli("submit", "--run", str(run), "--out", str(again))
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == out.read_bytes()
    assert "5 rows x 3 classes" in result.stdout


@pytest.mark.slow
def test_folder_layout_reports_hold_out_scores(folder_data, tmp_path):
    out = tmp_path / "sub.csv"
    result = run_cli("run", "--data", str(folder_data), "--run", str(tmp_path / "run"), "--out", str(out),
                     *FAST_EXTRACT, "--head", "seed", "--folds", "2", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "hold-out test" in result.stdout
    rows = [line.split("  ")[0] for line in result.stdout.splitlines() if "  hold-out test  " in line]
    assert rows == ["original", "flipped", "ensemble"], "hold-out rows are named as the OOF rows are"
    holdout = select_recipe(RunFolder(tmp_path / "run")).metrics()["holdout"]
    assert holdout["ensemble"]["n"] == 6
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["id", "kind 0", "kind 1", "kind 2"] and len(frame) == 6


def test_help_and_submit_do_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from transfer_ensemble import cli, workflow, submission;"
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr

"""Same data, options and --seed: the same folds and a byte-identical submission; config.json reruns.

Three runs in three run folders: the step commands, `run` with the same options, and
`run --config FIRST/config.json`. The seed is not the default, so a lost seed would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_TRAIN, TINY, make_kaggle, run_cli
from transfer_ensemble.crossval import fold_assignment, fold_dir
from transfer_ensemble.features import VIEWS

SEED = "3"
EXTRACT = ["--weights", "random", "--image-size", str(TINY), "--batch-size", "8"]
FOLDS = int(FAST_TRAIN[FAST_TRAIN.index("--folds") + 1])


def test_fold_assignment_is_fixed_by_the_seed_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [5, 7, 6, 9])
    first = fold_assignment(labels, 3, seed=11)
    np.testing.assert_array_equal(first, fold_assignment(labels.copy(), 3, seed=11))
    assert not np.array_equal(first, fold_assignment(labels, 3, seed=12))
    for c in range(4):
        counts = np.bincount(first[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("repro")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    steps, same, again = base / "steps", base / "same", base / "again"
    for args in (["extract", "--data", str(data), "--run", str(steps), *EXTRACT, "--seed", SEED],
                 ["train", "--run", str(steps), *FAST_TRAIN, "--seed", SEED],
                 ["submit", "--run", str(steps), "--out", str(base / "steps.csv")],
                 ["run", "--data", str(data), "--run", str(same), "--out", str(base / "same.csv"),
                  *EXTRACT, *FAST_TRAIN, "--seed", SEED],
                 ["run", "--config", str(steps / "config.json"), "--run", str(again),
                  "--out", str(base / "again.csv")]):
        result = run_cli(*args)
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr}"
    return {"steps": steps, "same": same, "again": again}


@pytest.mark.parametrize("other", ["same", "again"])
def test_identical_submission_csv(runs: dict[str, Path], other: str) -> None:
    first = (runs["steps"].parent / "steps.csv").read_bytes()
    assert first.count(b"\n") == 6
    assert (runs[other].parent / f"{other}.csv").read_bytes() == first


@pytest.mark.parametrize("other", ["same", "again"])
def test_identical_folds_features_and_predictions(runs: dict[str, Path], other: str) -> None:
    for view in VIEWS:
        for fold in range(FOLDS):
            for name in ("val_index.npy", "val_pred.npy", "test_pred.npy"):
                np.testing.assert_array_equal(np.load(fold_dir(runs[other] / "heads", view, fold) / name),
                                              np.load(fold_dir(runs["steps"] / "heads", view, fold) / name))
    for backbone in ("xception", "inception_v3"):
        for split in ("train", "test"):
            for view in VIEWS:
                path = Path("features", split, backbone, f"{view}.npy")
                np.testing.assert_array_equal(np.load(runs[other] / path), np.load(runs["steps"] / path))
    metrics = [json.loads((runs[name] / "metrics.json").read_text()) for name in ("steps", other)]
    assert metrics[0] == metrics[1]


def test_config_json_holds_every_option_of_the_run(runs: dict[str, Path]) -> None:
    first, rerun = (json.loads((runs[name] / "config.json").read_text()) for name in ("steps", "again"))
    for key in ("data", "extract", "train", "on_bad_image", "classes"):
        assert rerun[key] == first[key], key
    assert first["extract"]["seed"] == int(SEED) and first["train"]["seed"] == int(SEED)
    assert first["train"]["folds"] == FOLDS and first["extract"]["image_size"] == TINY
    assert set(first["versions"]) >= {"python", "tensorflow", "keras", "numpy"}

"""Same data, options and --seed: the same folds and a byte-identical submission; config.json reruns.

Three runs in three run folders: the step commands, `run` with the same options, and
`run --config FIRST/config.json`. The seed is not the default, so a lost seed would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_TRAIN, TINY, make_kaggle, run_cli, run_in_process
from transfer_ensemble.crossval import fold_assignment
from transfer_ensemble.recipes import select_recipe
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.views import PAIR as VIEWS

SEED = "3"
EXTRACT = ["--weights", "random", "--image-size", str(TINY), "--batch-size", "8", "--scales", "1",
           "--backbones", "xception"]
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
    # The steps in this process, the two runs in their own: the same bytes across processes.
    for args, where in ((["extract", "--data", str(data), "--run", str(steps), *EXTRACT, "--seed", SEED], run_in_process),
                        (["train", "--run", str(steps), *FAST_TRAIN, "--seed", SEED], run_in_process),
                        (["submit", "--run", str(steps), "--out", str(base / "steps.csv")], run_in_process),
                        (["run", "--data", str(data), "--run", str(same), "--out", str(base / "same.csv"),
                          *EXTRACT, *FAST_TRAIN, "--seed", SEED], run_cli),
                        (["run", "--config", str(steps / "config.json"), "--run", str(again),
                          "--out", str(base / "again.csv")], run_cli)):
        result = where(*args)
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr}"
    return {"steps": steps, "same": same, "again": again}


@pytest.mark.slow
@pytest.mark.parametrize("other", ["same", "again"])
def test_identical_submission_csv(runs: dict[str, Path], other: str) -> None:
    first = (runs["steps"].parent / "steps.csv").read_bytes()
    assert first.count(b"\n") == 6
    assert (runs[other].parent / f"{other}.csv").read_bytes() == first


@pytest.mark.slow
@pytest.mark.parametrize("other", ["same", "again"])
def test_identical_folds_features_and_predictions(runs: dict[str, Path], other: str) -> None:
    first, second = RunFolder(runs["steps"]), RunFolder(runs[other])
    recipes = select_recipe(first), select_recipe(second)
    assert recipes[0].name == recipes[1].name
    for view in VIEWS:
        for fold in range(FOLDS):
            a, b = recipes[0].fold(view, fold), recipes[1].fold(view, fold)
            for name in ("val_index", "val_pred", "test_pred"):
                np.testing.assert_array_equal(np.load(getattr(a, name)), np.load(getattr(b, name)))
    for backbone in ("xception",):
        for split in ("train", "test"):
            for view in VIEWS:
                np.testing.assert_array_equal(np.load(first.store(split, backbone).view(view)),
                                              np.load(second.store(split, backbone).view(view)))
    assert recipes[0].metrics() == recipes[1].metrics()


@pytest.mark.slow
def test_config_json_holds_every_option_of_the_run(runs: dict[str, Path]) -> None:
    first, rerun = (json.loads((runs[name] / "config.json").read_text()) for name in ("steps", "again"))
    for key in ("data", "extract", "train", "classes"):
        assert rerun[key] == first[key], key
    assert first["extract"]["seed"] == int(SEED) and first["train"]["seed"] == int(SEED)
    assert first["train"]["folds"] == FOLDS and first["extract"]["image_size"] == TINY
    assert first["extract"]["on_bad_image"] == "error" and first["train"]["head"] == "seed"
    assert set(first["versions"]) >= {"python", "tensorflow", "keras", "numpy"}


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """`run` with no --head (the seed head's options given), then `run --config` of it elsewhere."""
    base = tmp_path_factory.mktemp("repro_default")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    first, again = base / "first", base / "again"
    options = [*EXTRACT, "--folds", str(FOLDS), "--epochs", "3", "--patience", "2", "--seed", SEED]
    for args, where in ((["run", "--data", str(data), "--run", str(first), "--out", str(base / "first.csv"), *options],
                         run_cli),
                        (["run", "--config", str(first / "config.json"), "--run", str(again),
                          "--out", str(base / "again.csv")], run_in_process)):
        result = where(*args)
        assert result.returncode == 0, f"{args[:2]} failed:\n{result.stderr}"
        assert result.stdout.startswith("chose ") or "\nchose " in result.stdout, result.stdout
    return base, first, again


@pytest.mark.slow
def test_run_without_a_head_trains_the_candidates_and_run_config_repeats_them(default_runs) -> None:
    base, first, again = default_runs
    seed, linear = f"seed-folds{FOLDS}-seed{SEED}-epochs3-patience2", f"linear-folds{FOLDS}-seed{SEED}"
    recipes = {seed, linear, f"blend-{seed}+{linear}"}
    configs = [json.loads((r / "config.json").read_text()) for r in (first, again)]
    for run, config in zip((first, again), configs):
        assert {p.name for p in (run / "heads").iterdir()} == recipes
        assert set(config["choose"]) == {"seed", "linear"} and config["heads"] in recipes
        assert select_recipe(RunFolder(run)).name == config["heads"]
    assert configs[0]["choose"] == configs[1]["choose"]
    assert configs[0]["choose"]["seed"]["epochs"] == 3, "the seed head's own options are repeated"
    assert configs[0]["heads"] == configs[1]["heads"]
    assert (base / "again.csv").read_bytes() == (base / "first.csv").read_bytes()

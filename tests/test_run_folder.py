"""The run folder as a database: nothing stale, nothing lost, recipes that never overwrite each other.

One trained run (Xception, random weights, 75 px, 2 folds) is shared by the module; each test
copies it (and the data, where it changes them). Commands run in-process through `cli.main`,
except where a fresh process matters (offline weights).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import FAST_TRAIN, TINY, draw, make_kaggle, run_cli, save_rgb
from transfer_ensemble import cli, ensemble, predict
from transfer_ensemble.config import LinearOptions, SeedOptions, TrainConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.recipes import list_recipes, recipe_for, recipe_name, recipe_statuses, select_recipe
from transfer_ensemble.records import DamagedFile, load_json, load_npy
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.store import StoreFiles, open_store
from transfer_ensemble.views import PAIR as VIEWS

EXTRACT = ["--backbones", "xception", "--weights", "random", "--image-size", str(TINY), "--batch-size", "8",
           "--scales", "1"]
FAST_CONFIG = TrainConfig(head="seed", folds=2, options=SeedOptions(epochs=3, patience=2))  # what FAST_TRAIN trains


@pytest.fixture
def call(capsys, caplog):
    """`call(*ARGS)` runs `transfer-ensemble ARGS` in this process: exit code, stdout, stderr and logs."""
    caplog.set_level(logging.INFO)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        caplog.clear()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err + caplog.text

    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("runfolder")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    run = base / "run"
    for args in (["extract", "--data", str(data), "--run", str(run), *EXTRACT],
                 ["train", "--run", str(run), *FAST_TRAIN],
                 ["submit", "--run", str(run), "--out", str(base / "sub.csv")]):
        assert cli.main(args) == 0, args
    return {"data": data, "run": run, "csv": (base / "sub.csv").read_bytes()}


@pytest.fixture
def copied(reference, tmp_path) -> tuple[Path, Path]:
    """The reference data and run, copied; config.json and dataset.json point at the copied data."""
    data = Path(shutil.copytree(reference["data"], tmp_path / "data"))
    run = Path(shutil.copytree(reference["run"], tmp_path / "run"))
    for name in ("config.json", "dataset.json"):
        text = (run / name).read_text().replace(str(reference["data"]), str(data))
        (run / name).write_text(text)
    return data, run


def files_and_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


def assert_clear_error(code: int, err: str, *needles: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ---- defect 1: a failed step changes nothing ----------------------------------------------------

@pytest.mark.slow
def test_a_failed_extract_leaves_the_recorded_run_as_it_was(copied, tmp_path):
    data, run = copied
    before = {name: (run / name).read_bytes() for name in ("config.json", "dataset.json", "bad_images.json")}
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    result = run_cli("extract", "--data", str(data), "--run", str(run), "--image-size", str(TINY),
                     env={"KERAS_HOME": str(keras_home)}, timeout=300)
    assert result.returncode == 2 and "Could not download the ImageNet weights" in result.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    assert RunFolder(run).extract_config().weights == "random"
    model = predict.Run.load(run)
    assert model.extract_config.weights == "random" and model.n_models == 4
    result = run_cli("report", "--run", str(run))
    assert result.returncode == 0, result.stderr
    assert "<b>--weights random</b>" in (run / "report.html").read_text()


# ---- defects 2 and 3: results know their inputs ------------------------------------------------

def rewrite_same_size_same_mtime(path: Path, image: np.ndarray) -> None:
    """Replace an image's content, keeping its byte size and modification time."""
    stat = path.stat()
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    data = encoded.tobytes()
    assert ok and len(data) <= stat.st_size, (len(data), stat.st_size)
    path.write_bytes(data + b"\0" * (stat.st_size - len(data)))  # bytes after IEND are ignored
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_a_changed_test_image_is_recomputed_and_never_submitted_stale(copied, reference, call, tmp_path):
    data, run = copied
    image = data / "test" / "te00.png"
    rewrite_same_size_same_mtime(image, np.full((48, 48, 3), 200, dtype=np.uint8))
    folder = RunFolder(run)
    recipe = select_recipe(folder)
    models = {job: recipe.fold(*job).model(".keras").stat().st_mtime_ns for job in recipe.jobs}

    code, out, err = call("extract", "--data", str(data), "--run", str(run), *EXTRACT)
    assert code == 0, err
    assert any(line.split()[:4] == ["test", "5", "1", "4"] and line.split()[-2:] == ["1x", "xception"]
               for line in out.splitlines()), out

    stale = tmp_path / "stale.csv"
    code, _, err = call("submit", "--run", str(run), "--out", str(stale))
    assert_clear_error(code, err, f"The test features of {run} changed after the head recipe",
                       f"train --run {run} --heads {recipe.name}")
    assert not stale.exists()

    code, _, err = call("train", "--run", str(run), "--heads", recipe.name)
    assert code == 0, err
    assert "predicting them again with 4 finished fold models" in err
    assert {job: recipe.fold(*job).model(".keras").stat().st_mtime_ns for job in recipe.jobs} == models
    out_csv = tmp_path / "new.csv"
    assert call("submit", "--run", str(run), "--out", str(out_csv))[0] == 0
    new = pd.read_csv(out_csv).set_index("id")
    old = pd.read_csv(pd.io.common.BytesIO(reference["csv"])).set_index("id")
    assert not np.allclose(new.loc["te00"], old.loc["te00"])
    pd.testing.assert_frame_equal(new.drop(index="te00"), old.drop(index="te00"))


@pytest.mark.slow
def test_features_of_another_size_or_backbone_make_the_heads_stale(copied, call, tmp_path):
    data, run = copied
    name = recipe_name(FAST_CONFIG)
    code, _, err = call("extract", "--data", str(data), "--run", str(run), *EXTRACT[:-4],
                        "--image-size", "80")
    assert code == 0, err
    for args in (["submit", "--run", str(run), "--out", str(tmp_path / "s.csv")],
                 ["predict", "--run", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "p.csv")],
                 ["report", "--run", str(run)]):
        code, _, err = call(*args)
        assert_clear_error(code, err, f"The head recipe '{name}' of {run} was trained on other features",
                           f"--heads {name}")
    code, _, err = call("submit", "--run", str(run), "--heads", "best", "--out", str(tmp_path / "s.csv"))
    assert_clear_error(code, err, f"Its head recipes {name} were trained on features or labels that "
                                  f"have changed since")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "p.csv").exists()

    code, _, err = call("extract", "--data", str(data), "--run", str(run), "--backbones", "mobilenet_v3_small",
                        "--weights", "random", "--image-size", str(TINY))
    assert code == 0, err
    code, _, err = call("predict", "--run", str(run), "--images", str(data / "test"),
                        "--out", str(tmp_path / "p.csv"))
    assert_clear_error(code, err, f"The head recipe '{name}' of {run} was trained on other features")

    code, out, err = call("train", "--run", str(run), "--head", "seed")
    assert code == 0, err
    assert f"head recipe {name}: the features or labels changed since it was trained" in err
    code, out, err = call("predict", "--run", str(run), "--images", str(data / "test"),
                          "--out", str(tmp_path / "p.csv"))
    assert code == 0, err
    assert select_recipe(RunFolder(run)).inputs["features"].keys() == {"mobilenet_v3_small"}


@pytest.mark.slow
def test_changed_labels_make_the_heads_stale_though_no_feature_changes(copied, call, tmp_path):
    data, run = copied
    labels = pd.read_csv(data / "labels.csv")
    labels.loc[0, "breed"], labels.loc[len(labels) - 1, "breed"] = labels.loc[len(labels) - 1, "breed"], \
        labels.loc[0, "breed"]
    labels.to_csv(data / "labels.csv", index=False)
    code, out, err = call("extract", "--data", str(data), "--run", str(run), *EXTRACT)
    assert code == 0 and "all features were already computed" in out, err
    code, _, err = call("submit", "--run", str(run), "--out", str(tmp_path / "s.csv"))
    assert_clear_error(code, err, "was trained on other features or labels than the run has now")
    assert call("train", "--run", str(run), "--head", "seed")[0] == 0
    assert call("submit", "--run", str(run), "--out", str(tmp_path / "s.csv"))[0] == 0


@pytest.mark.slow
def test_a_same_size_rewrite_with_its_mtime_restored_is_recomputed(copied, call):
    data, run = copied
    store = RunFolder(run).store("train", "xception")
    before = np.load(store.view("original"))
    ids = load_json(store.meta)["ids"]
    rewrite_same_size_same_mtime(data / "train" / "tr1_2.png", np.full((48, 48, 3), 9, dtype=np.uint8))
    code, out, err = call("extract", "--data", str(data), "--run", str(run), *EXTRACT)
    assert code == 0, err
    assert any(line.split()[:4] == ["train", "12", "1", "11"] and line.split()[-2:] == ["1x", "xception"]
               for line in out.splitlines()), out
    after = np.load(store.view("original"))
    changed = [ids[i] for i in np.flatnonzero((after != before).any(axis=1))]
    assert changed == ["tr1_2"]


# ---- defect 4: damaged or deleted files ----------------------------------------------------------

def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage{")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _fold(run: Path):
    return recipe_for(RunFolder(run), FAST_CONFIG).fold("flipped", 1)


# What to damage, how, the step that must refuse naming the file (None: none refuses), and the
# step that repairs it (saying so, unless it rewrites the file without reading it).
DAMAGE = {
    "features original.npy deleted": (lambda r: RunFolder(r).store("train", "xception").view("original"),
                                      Path.unlink, "train", "extract"),
    "features keys.json garbage": (lambda r: RunFolder(r).store("test", "xception").keys, _garbage,
                                   "submit", "extract"),
    "features done.npy truncated": (lambda r: RunFolder(r).store("train", "xception").done, _truncate,
                                    "train", "extract"),
    "config.json garbage": (lambda r: RunFolder(r).config_path, _garbage, "submit", "extract"),
    "dataset.json garbage": (lambda r: RunFolder(r).dataset_path, _garbage, "submit", "extract"),
    "image_check.json garbage": (lambda r: RunFolder(r).image_check_path, _garbage, None, "extract"),
    "recipe.json garbage": (lambda r: recipe_for(RunFolder(r), FAST_CONFIG).record_path, _garbage, "submit", "train"),
    "recipe metrics.json garbage": (lambda r: recipe_for(RunFolder(r), FAST_CONFIG).metrics_path, _garbage,
                                    "submit", "train"),
    "fold done.json garbage": (lambda r: _fold(r).done, _garbage, "submit", "train"),
    "fold test_pred.npy truncated": (lambda r: _fold(r).test_pred, _truncate, "submit", "train"),
    "fold history.json garbage": (lambda r: _fold(r).history, _garbage, "report", "train"),
    "fold model.keras garbage": (lambda r: _fold(r).model(".keras"), _garbage, "predict", "train"),
    "oof_flipped.npy truncated": (lambda r: recipe_for(RunFolder(r), FAST_CONFIG).oof("flipped"), _truncate,
                                  "report", "train"),
}
REWRITTEN_UNREAD = {"dataset.json", "metrics.json", "oof_flipped.npy"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_file_is_named_and_repaired_by_rerunning(copied, reference, call, tmp_path, case):
    data, run = copied
    target, damage, refuses, repairs = DAMAGE[case]
    path = target(run)
    damage(path)
    commands = {
        "extract": ["extract", "--data", str(data), "--run", str(run), *EXTRACT],
        "train": ["train", "--run", str(run), "--head", "seed"],
        "submit": ["submit", "--run", str(run), "--out", str(tmp_path / "refused.csv")],
        "report": ["report", "--run", str(run)],
        "predict": ["predict", "--run", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "p.csv")],
    }
    if refuses is not None:
        code, _, err = call(*commands[refuses])
        assert_clear_error(code, err)
        assert str(path) in err or (path.name == "metrics.json" and "unfinished" in err), err
    code, _, err = call(*commands[repairs])
    assert code == 0, err
    assert str(path) in err or path.name in REWRITTEN_UNREAD, err
    if repairs == "extract":
        assert call(*commands["train"], *FAST_TRAIN)[0] == 0
    out = tmp_path / "sub.csv"
    code, _, err = call("submit", "--run", str(run), "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == reference["csv"]
    assert call(*commands["report"])[0] == 0


# ---- defect 5: predict reuses features per image, and can leave the run untouched ---------------

@pytest.mark.slow
def test_predict_reuses_features_per_image_and_writes_only_to_its_cache_dir(copied, call, tmp_path):
    data, run = copied
    batch = tmp_path / "batch"
    shutil.copytree(data / "test", batch)
    rng = np.random.default_rng(11)
    for i in range(2):
        save_rgb(batch / f"new{i}.png", draw(i, rng))
    before = files_and_times(run)
    out = tmp_path / "preds.csv"
    code, stdout, err = call("predict", "--run", str(run), "--images", str(batch), "--out", str(out),
                             "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert "features: 2 computed" in stdout and "5 reused" in stdout, "the run's own test images were recomputed"
    assert files_and_times(run) == before, "predict with --cache-dir wrote into the run folder"

    again = tmp_path / "again.csv"
    code, stdout, err = call("predict", "--run", str(run), "--images", str(batch), "--out", str(again))
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(again))

    subset = tmp_path / "subset.csv"
    pd.DataFrame({"path": [str(batch / "new1.png"), str(batch / "te03.png")]}).to_csv(subset, index=False)
    code, stdout, err = call("predict", "--run", str(run), "--images", str(subset),
                             "--out", str(tmp_path / "subset_preds.csv"))
    assert code == 0, err
    assert "features: 0 computed" in stdout and "2 reused" in stdout, "another list recomputed known images"
    by_name = pd.read_csv(out).set_index("image")
    got = pd.read_csv(tmp_path / "subset_preds.csv")
    np.testing.assert_allclose(got.drop(columns="image").to_numpy(),
                               by_name.loc[["new1.png", "te03.png"]].to_numpy(), atol=1e-7)


# ---- recipes side by side --------------------------------------------------------------------

@pytest.mark.slow
def test_other_options_add_a_recipe_beside_the_first_and_the_last_is_used(copied, reference, call, tmp_path):
    data, run = copied
    folder = RunFolder(run)
    first = recipe_for(folder, FAST_CONFIG)
    kept = files_and_times(first.folder)
    code, out, err = call("train", "--run", str(run), "--head", "seed", "--epochs", "1")
    assert code == 0, err
    second = recipe_for(folder, TrainConfig(head="seed", folds=2, options=SeedOptions(epochs=1, patience=2)))
    assert second.name == "seed-folds2-epochs1-patience2" and second.folder.is_dir()
    assert files_and_times(first.folder) == kept, "training other options touched the first recipe"
    statuses = recipe_statuses(folder)
    assert [s.recipe.name for s in statuses] == sorted([first.name, second.name],
                                                       key=lambda n: recipe_for(folder, 
                                                           first.config if n == first.name else second.config
                                                       ).metrics()["oof"]["ensemble"]["log_loss"])
    assert all(s.state == "current" for s in statuses)
    table = out.split("\n\n")[-1]
    assert table.index(statuses[0].recipe.name) < table.index(statuses[1].recipe.name)

    code, out, err = call("submit", "--run", str(run), "--out", str(tmp_path / "last.csv"))
    assert code == 0 and f"head recipe {second.name}" in out, "submit uses the recipe trained last"
    code, out, err = call("submit", "--run", str(run), "--heads", "best", "--out", str(tmp_path / "best.csv"))
    assert code == 0 and f"head recipe {statuses[0].recipe.name}" in out
    code, out, err = call("submit", "--run", str(run), "--heads", first.name,
                          "--out", str(tmp_path / "first.csv"))
    assert code == 0, err
    assert (tmp_path / "first.csv").read_bytes() == reference["csv"]
    code, out, err = call("submit", "--run", str(run), "--heads", second.name,
                          "--out", str(tmp_path / "second.csv"))
    preds = [np.load(second.fold(v, k).test_pred) for v in VIEWS for k in range(2)]
    frame = pd.read_csv(tmp_path / "second.csv").set_index("id")
    ids = [r["id"] for r in load_json(folder.dataset_path)["test"]]
    np.testing.assert_allclose(frame.loc[ids].to_numpy(), ensemble.combine({"all": preds}), atol=1e-6)
    code, _, err = call("submit", "--run", str(run), "--heads", "nope", "--out", str(tmp_path / "x.csv"))
    assert_clear_error(code, err, "--heads 'nope'", first.name, second.name)

    assert call("report", "--run", str(run))[0] == 0
    page = folder.report_html.read_text()
    assert "Head recipes tried on this run" in page and first.name in page and second.name in page


@pytest.mark.slow
def test_train_of_the_same_head_reuses_the_recorded_options(copied, call):
    _, run = copied
    folder = RunFolder(run)
    recipe = recipe_for(folder, FAST_CONFIG)
    kept = files_and_times(recipe.folder / "original")
    code, out, err = call("train", "--run", str(run), "--head", "seed")
    assert code == 0, err
    assert f"head recipe {recipe.name}:" in out and "reusing 4 finished fold models; training 0" in err
    assert [r.name for r in list_recipes(folder)] == [recipe.name]
    assert files_and_times(recipe.folder / "original") == kept
    assert folder.train_config({"head": "seed"}) == FAST_CONFIG


# ---- fast unit tests of the pieces ---------------------------------------------------------------

def test_recipe_names_show_the_head_and_each_non_default_option():
    assert recipe_name(TrainConfig()) == "linear"
    assert recipe_name(TrainConfig(head="seed")) == "seed"
    assert recipe_name(TrainConfig(head="seed", tta=True)) == "seed-tta"
    assert recipe_name(TrainConfig(temperature=False, options=LinearOptions(power=False))) == \
        "linear-no_temperature-no_power"
    assert recipe_name(TrainConfig(head="seed", folds=3, options=SeedOptions(learning_rate=0.0005))) == \
        "seed-folds3-learning_rate0.0005"
    assert recipe_name(TrainConfig(seed=1)) != recipe_name(TrainConfig(seed=2))


def test_readers_name_the_damaged_file(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 3), dtype=np.float32))
    assert load_npy(path, (4, None), np.float32).shape == (4, 3)
    with pytest.raises(DamagedFile, match="has shape"):
        load_npy(path, (5, 3))
    _truncate(path)
    with pytest.raises(DamagedFile, match=f"{path} is not a readable .npy array"):
        load_npy(path)
    (tmp_path / "x.json").write_text("[1, 2")
    with pytest.raises(DamagedFile, match="is not valid JSON"):
        load_json(tmp_path / "x.json")
    with pytest.raises(DamagedFile, match="is missing"):
        load_json(tmp_path / "none.json")


def _meta(ids: list[str]) -> dict:
    return {"backbone": "toy", "width": 3, "weights": "random:seed=0", "image_size": 8, "ids": ids}


def test_a_store_copies_known_rows_from_donors_and_rebuilds_when_damaged(tmp_path):
    donor = open_store(StoreFiles(tmp_path / "donor"), _meta(["a", "b"]), ["ka", "kb"])
    donor.write(np.array([0, 1]), {view: np.array([[1, 1, 1], [2, 2, 2]], np.float32) for view in VIEWS})
    store = open_store(StoreFiles(tmp_path / "new"), _meta(["x", "y", "z"]), ["kb", "kq", "ka"],
                                donors=[StoreFiles(tmp_path / "donor")])
    assert store.done.tolist() == [True, False, True]
    np.testing.assert_array_equal(np.load(store.files.view("original"))[[0, 2]], [[2, 2, 2], [1, 1, 1]])

    other = open_store(StoreFiles(tmp_path / "other"), {**_meta(["x"]), "image_size": 9}, ["ka"],
                                donors=[StoreFiles(tmp_path / "donor")])
    assert not other.done.any(), "rows of other settings were reused"

    store.files.view("flipped").unlink()
    reopened = open_store(store.files, _meta(["x", "y", "z"]), ["kb", "kq", "ka"])
    assert not reopened.done.any() and store.files.view("flipped").exists()


def test_train_config_overrides_keep_the_rest_of_the_recorded_options(tmp_path):
    folder = RunFolder(tmp_path)
    folder.update_config(extract={"backbones": ["xception"]},
                         train={"head": "seed", "folds": 3, "epochs": 7, "seed": 4})
    assert folder.train_config({"head": "seed"}) == \
        TrainConfig(head="seed", folds=3, seed=4, options=SeedOptions(epochs=7))
    assert folder.train_config({"head": "seed", "epochs": 9, "folds": None}) == \
        TrainConfig(head="seed", folds=3, seed=4, options=SeedOptions(epochs=9))
    # A bare train trains the default head, with the run's folds and seed.
    assert folder.train_config() == TrainConfig(folds=3, seed=4)
    with pytest.raises(UserError, match="--epochs 9 .*option of --head seed"):
        folder.train_config({"epochs": 9})
    with pytest.raises(UserError, match="--folds"):
        folder.train_config({"folds": 1})

"""`transfer-ensemble predict` and `Run.load(...).predict(...)` against one tiny trained run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_EXTRACT, FAST_TRAIN, draw, make_kaggle, run_cli, save_rgb
from transfer_ensemble import ensemble, images, predict, storage
from transfer_ensemble.errors import UserError
from transfer_ensemble.recipes import select_recipe
from transfer_ensemble.runfolder import RunFolder

pytestmark = pytest.mark.slow  # every test uses the module's trained run (the CLI in a subprocess)

SECTIONS = ("loss", "scores", "calibration", "confused", "per-class", "wrong")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on generated images (Kaggle layout), and its submission."""
    base = tmp_path_factory.mktemp("predict")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    run, sub = base / "run", base / "sub.csv"
    result = run_cli("run", "--data", str(data), "--run", str(run), "--out", str(sub), *FAST_EXTRACT, *FAST_TRAIN)
    assert result.returncode == 0, result.stderr
    return data, run, sub


@pytest.fixture(scope="module")
def cli_preds(trained):
    """`predict` over the run's own test folder, probabilities format."""
    data, run, _ = trained
    out = run.parent / "preds" / "test.csv"
    result = run_cli("predict", "--run", str(run), "--images", str(data / "test"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return pd.read_csv(out), result


def _by_stem(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(image=[Path(p).stem for p in frame["image"]]).set_index("image").sort_index()


@pytest.mark.backend
def test_predict_equals_the_submission_on_the_runs_test_images(trained, cli_preds):
    _, run, sub = trained
    preds, result = cli_preds
    submission = pd.read_csv(sub).set_index("id").sort_index()
    got = _by_stem(preds)
    assert list(got.columns) == list(submission.columns)
    assert list(got.index) == list(submission.index)
    np.testing.assert_allclose(got.to_numpy(), submission.to_numpy(), rtol=0, atol=1e-7)
    assert "wrote" in result.stdout and "5 images" in result.stdout and "4 models" in result.stdout


def test_python_api_equals_the_cli(trained, cli_preds, tmp_path):
    data, run, _ = trained
    preds, _ = cli_preds
    model = predict.Run.load(run)
    paths = [data / "test" / name for name in preds["image"]]
    expected = preds.drop(columns="image").to_numpy()
    from_paths = model.predict(paths, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(from_paths, expected, rtol=0, atol=1e-6)
    from_arrays = model.predict([images.decode(p) for p in paths])
    np.testing.assert_allclose(from_arrays, expected, rtol=0, atol=1e-5)
    recipe = select_recipe(RunFolder(run))
    original = ensemble.average([np.load(recipe.fold("original", k).test_pred) for k in range(2)])
    sub_order = pd.read_csv(run.parent / "sub.csv")["id"]
    by_id = dict(zip(sub_order, original))
    no_tta = model.predict([str(p) for p in paths], tta=False)
    np.testing.assert_allclose(no_tta, np.stack([by_id[p.stem] for p in paths]), rtol=0, atol=1e-6)


def test_top_k_from_a_csv_of_relative_paths(trained, cli_preds):
    data, run, _ = trained
    preds, _ = cli_preds
    lists = run.parent / "lists"
    lists.mkdir()
    names = [f"../data/test/{name}" for name in preds["image"]]
    pd.DataFrame({"note": ["x"] * len(names), "filepath": names}).to_csv(lists / "batch.csv", index=False)
    out = run.parent / "preds" / "top2.csv"
    result = run_cli("predict", "--run", str(run), "--images", str(lists / "batch.csv"), "--out", str(out),
                     "--format", "top-k", "--k", "2")
    assert result.returncode == 0, result.stderr
    top = pd.read_csv(out)
    assert list(top.columns) == ["image", "label_1", "prob_1", "label_2", "prob_2"]
    assert list(top["image"]) == names
    classes = list(preds.columns[1:])
    assert set(top["label_1"]) | set(top["label_2"]) <= set(classes)
    assert (top["label_1"] != top["label_2"]).all()
    assert (top["prob_1"] >= top["prob_2"]).all()
    probabilities = preds.drop(columns="image").to_numpy()
    np.testing.assert_allclose(top["prob_1"], probabilities.max(axis=1), rtol=0, atol=1e-7)
    assert list(top["label_1"]) == [classes[i] for i in probabilities.argmax(axis=1)]


def test_refuses_weights_other_than_the_runs(trained, tmp_path):
    data, run, _ = trained
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("xception", "inception_v3"):
        (weights / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"other weights")
    out = tmp_path / "out.csv"
    result = run_cli("predict", "--run", str(run), "--images", str(data / "test"), "--out", str(out),
                     "--weights", str(weights))
    assert result.returncode == 2
    assert "not the ones the run" in result.stderr and "random:seed=0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_images_are_listed_and_nothing_is_scored(trained, tmp_path):
    _, run, _ = trained
    folder = tmp_path / "batch"
    save_rgb(folder / "good.png", draw(0, np.random.default_rng(1)))
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out.csv"
    result = run_cli("predict", "--run", str(run), "--images", str(folder), "--out", str(out))
    assert result.returncode == 2
    assert "2 images cannot be decoded" in result.stderr
    assert "broken.jpg" in result.stderr and "empty.png" in result.stderr and "good.png" not in result.stderr
    assert not out.exists()


def test_a_killed_predict_resumes_and_gives_the_uninterrupted_output(trained, tmp_path):
    _, run, _ = trained
    folder = tmp_path / "many"
    rng = np.random.default_rng(3)
    for i in range(24):
        save_rgb(folder / f"img{i:02d}.png", draw(i % 3, rng))
    out = tmp_path / "many.csv"
    args = ["predict", "--run", str(run), "--images", str(folder), "--out", str(out), "--batch-size", "1"]
    paths, _ = predict.find_images(folder)
    cache = RunFolder(run).predict_cache(predict.check_images(paths))

    def committed() -> np.ndarray:
        """Rows whose features both backbones have committed."""
        return np.load(cache.store("xception").done) & np.load(cache.store("inception_v3").done)

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "transfer_ensemble", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if committed().any():
                    break
            except (FileNotFoundError, ValueError, EOFError, OSError):
                pass
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done = committed()
    assert done.any() and not done.all(), f"killed too late to test resuming ({int(done.sum())} of 24 done)"
    assert not out.exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{24 - int(done.sum())} computed" in result.stdout and f"{int(done.sum())} reused" in result.stdout
    resumed = pd.read_csv(out)
    reference = predict.Run.load(run).predict(paths, batch_size=1, cache_dir=tmp_path / "reference")
    assert list(resumed["image"]) == [p.name for p in paths]
    np.testing.assert_allclose(resumed.drop(columns="image").to_numpy(), reference, rtol=0, atol=1e-6)


def test_train_wrote_the_report(trained):
    _, run, _ = trained
    page = (run / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert len(list((run / "report").glob("*.png"))) >= 4


def test_a_second_predict_of_the_same_images_is_told_to_wait_or_use_another_cache(trained, tmp_path):
    _, run, _ = trained
    rng = np.random.default_rng(5)
    paths = [tmp_path / "same" / f"img{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        save_rgb(path, draw(i, rng))
    cache = RunFolder(run).predict_cache(predict.check_images(paths), tmp_path / "cache")
    scorer = predict.Run.load(run)
    with storage.run_lock(cache.folder):  # the first predict, still scoring these images
        with pytest.raises(UserError) as refused:
            scorer.predict(paths, cache_dir=tmp_path / "cache")
    message = str(refused.value)
    assert "Another predict" in message and "the same images" in message and "--cache-dir" in message
    assert "--run folder" not in message
    assert scorer.predict(paths, cache_dir=tmp_path / "cache").shape == (2, len(scorer.classes))


def test_train_reads_the_datasets_records_and_hashes_each_store_once(trained, tmp_path, monkeypatch):
    """One `train` (here finishing an already trained recipe, with its report) builds the run's
    state once: dataset.json read once, each store's keys.json once, not once per recipe_statuses()."""
    from transfer_ensemble import runfolder, workflow
    from transfer_ensemble.store import StoreFiles

    _, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    reads: list[Path] = []
    real = runfolder.load_json

    def counting(path, *args, **kwargs):
        reads.append(Path(path))
        return real(path, *args, **kwargs)

    hashed: list[Path] = []
    real_identity = StoreFiles.identity

    def identity(files: StoreFiles, *views) -> str:
        hashed.append(files.keys)
        return real_identity(files, *views)

    monkeypatch.setattr(runfolder, "load_json", counting)
    monkeypatch.setattr(StoreFiles, "identity", identity)  # the store's identity hashes its keys.json
    result = workflow.train(copy, heads=RunFolder(copy).read_config()["heads"])
    assert [s.state for s in result.statuses] == ["current"]
    keys = sorted(hashed)
    assert len(keys) == 4 and len(set(keys)) == 4, keys  # 2 backbones x (train, test), one scale
    assert [p for p in reads if p.name == "dataset.json"] == [copy / "dataset.json"]


def test_python_api_takes_one_path_and_refuses_bad_arguments_in_the_clis_words(trained, tmp_path):
    from transfer_ensemble import workflow

    data, run, _ = trained
    model = predict.Run.load(run)
    one = sorted((data / "test").iterdir())[0]
    single = model.predict(str(one), cache_dir=tmp_path / "cache")
    assert single.shape == (1, len(model.classes))
    np.testing.assert_allclose(single, model.predict([one], cache_dir=tmp_path / "cache"), rtol=0, atol=1e-7)
    with pytest.raises(UserError, match=r"Image 1 is None \(null\); pass image paths or RGB uint8 arrays"):
        model.predict([one, None])
    with pytest.raises(UserError, match=r"Image 0 is an empty array of shape \(0, 0, 3\)"):
        model.predict([np.zeros((0, 0, 3), np.uint8)])
    with pytest.raises(UserError, match=r"batch_size=-3 \(given to Run.predict\) is out of range: it must be a "
                                        r"whole number of at least 1"):
        model.predict([images.decode(one)], batch_size=-3)
    out = tmp_path / "top.csv"
    with pytest.raises(UserError, match=r"k=-1 \(given to predict_to_csv\) is out of range"):
        predict.predict_to_csv(run, data / "test", out, fmt="top-k", k=-1)
    assert not out.exists()
    with pytest.raises(UserError) as info:
        workflow.blend(run, "linear,seed")
    assert "'linear' is not a trained, current head recipe" in str(info.value), str(info.value)


def test_a_weights_folder_recorded_relative_by_an_older_run_is_explained(trained, tmp_path, monkeypatch):
    """Runs once recorded --weights DIR as typed; from another directory predict says so and how to go on."""
    _, run, _ = trained
    copy = Path(shutil.copytree(run, tmp_path / "old_run"))
    config = json.loads((copy / "config.json").read_text())
    config["extract"]["weights"] = "my_weights"
    (copy / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError, match=r"my_weights, a path recorded relative to the folder `extract` ran in.*"
                                        r"Run predict from that folder, or: Pass --weights"):
        predict.Run.load(copy)

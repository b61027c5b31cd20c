"""Regression tests of issue 19: streams, stores that match the record, clear refusals, small waste.

Fast tests call functions directly; the few that need a trained run share one (Xception,
random weights, 75 px, 2 folds), trained in-process by `trained` below.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from importlib import util
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, load_script, make_kaggle, run_cli
from transfer_ensemble import cli
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.dataset import load_dataset
from transfer_ensemble.errors import UserError
from transfer_ensemble.recipes import blend_folder, select_recipe
from transfer_ensemble.store import StoreFiles, open_store
from transfer_ensemble.views import PAIR as VIEWS


def _meta(ids: list[str]) -> dict:
    return {"backbone": "toy", "width": 3, "weights": "random:seed=0", "image_size": 8, "ids": ids}


# item 3
@pytest.mark.parametrize("scales", ["1,1.5,1.5000001", "1,1.00001", "1,1.49,1.5"])
def test_scales_that_share_a_store_name_or_a_pixel_size_are_refused(scales):
    with pytest.raises(UserError, match="--scales"):
        ExtractConfig(backbones=("xception",), image_size=TINY, scales=scales)
    assert ExtractConfig(backbones=("xception",), image_size=TINY, scales="1,1.5").scales == (1.0, 1.5)


# item 7
def test_a_data_set_of_one_class_is_refused_before_extracting(tmp_path):
    data = make_kaggle(tmp_path / "data", n_classes=1)
    with pytest.raises(UserError, match="two or more classes"):
        load_dataset(data)


# item 12
def test_classes_left_empty_by_skipped_images_name_them_and_their_reasons(tmp_path):
    from transfer_ensemble import workflow

    dataset = load_dataset(make_kaggle(tmp_path / "data", n_classes=2, per_class=2))
    bad = [(it, "has 2,304 pixels, more than the 40 allowed (--max-pixels)") for it in dataset.train
           if it.label == 0]
    dataset.train = [it for it in dataset.train if it.label != 0]
    with pytest.raises(UserError) as info:
        workflow._check_classes_left(dataset, bad)
    message = str(info.value)
    assert "undecodable" not in message and "listed above" not in message
    assert all(str(it.path) in message for it, _ in bad) and "--max-pixels" in message


# item 13
def test_submit_on_a_data_folder_says_it_is_no_run_folder_and_writes_nothing(tmp_path):
    from transfer_ensemble import workflow

    data = make_kaggle(tmp_path / "data")
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(UserError, match="not a run folder"):
        workflow.submit(data, tmp_path / "sub.csv")
    assert sorted(p.name for p in data.iterdir()) == before
    assert not (tmp_path / "sub.csv").exists()


# item 16
def test_a_damaged_donor_store_is_reported_as_not_reused(tmp_path, caplog):
    donor = open_store(StoreFiles(tmp_path / "donor"), _meta(["a"]), ["ka"])
    donor.files.view("flipped").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING):
        open_store(StoreFiles(tmp_path / "new"), _meta(["x"]), ["ka"], donors=[donor.files])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "recomputing nothing" not in warned and "not reused" in warned and str(donor.files.folder) in warned


# item 18
def test_an_image_named_several_times_copies_its_cached_row_for_every_duplicate(tmp_path):
    donor = open_store(StoreFiles(tmp_path / "donor"), _meta(["a", "b"]), ["ka", "kb"])
    donor.write(np.array([0, 1]), {view: np.array([[1, 1, 1], [2, 2, 2]], np.float32) for view in VIEWS})
    store = open_store(StoreFiles(tmp_path / "new"), _meta(["0", "1", "2", "3"]), ["ka", "kb", "ka", "ka"],
                                donors=[donor.files])
    assert store.done.tolist() == [True] * 4
    np.testing.assert_array_equal(np.load(store.files.view("original")), [[1] * 3, [2] * 3, [1] * 3, [1] * 3])


# item 19
def test_the_demo_on_random_weights_says_what_its_scores_mean(monkeypatch, capsys):
    demo_script = load_script("demo")
    from transfer_ensemble.backbones import WeightsUnavailableError

    calls = []

    def extract(data, run, config, **kwargs):
        calls.append(config.weights)
        if config.weights != "random":
            raise WeightsUnavailableError("offline")
        return []

    monkeypatch.setattr(demo_script.workflow, "extract", extract)
    monkeypatch.setattr(demo_script.workflow, "train", lambda run, overrides: demo_script.TrainResult("linear", {}, []))
    monkeypatch.setattr(demo_script.workflow, "submit", lambda run, out, heads: None)
    demo_script.run_workflow(["--data", "d", "--run", "r", "--out", "o.csv"])
    note = capsys.readouterr().err
    assert calls == ["imagenet", "random"]
    assert "ln(4)" not in note and "1.386" not in note
    assert "separable" in note and "random" in note.lower()


# item shared (the trained run of items 5, 6, 8, 17, 10, 2 and 1)
EXTRACT = ["--backbones", "xception", "--weights", "random", "--image-size", str(TINY), "--batch-size", "8",
           "--scales", "1"]
SEED_TTA = ["--head", "seed", "--folds", "2", "--epochs", "3", "--patience", "2", "--tta", "--temperature",
            "--dropout", "0.25", "--learning-rate", "0.002", "--head-batch-size", "16"]
LINEAR = ["--head", "linear", "--folds", "2", "--no-pool-views", "--no-power", "--no-temperature", "--no-tta", "--no-multiscale"]
SEED_POOLED = ["--head", "seed", "--folds", "2", "--epochs", "2", "--patience", "1", "--pool-views", "--tta",
               "--temperature", "--multiscale", "--dropout", "0.3", "--learning-rate", "0.003",
               "--head-batch-size", "8"]


def _recipe_of(run: Path, args: list[str]) -> str:
    from transfer_ensemble.recipes import recipe_name

    return recipe_name(cli.train_config(cli.build_parser().parse_args(["train", "--run", str(run), *args])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A run (3 classes x 4 images, 5 test images) with three recipes of long names: a seed recipe
    with TTA (per-view models), a linear one, and a pooled seed one; no blend yet."""
    base = tmp_path_factory.mktemp("issue19")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    run = base / "run"
    assert cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT]) == 0
    for args in (SEED_TTA, LINEAR, SEED_POOLED):
        assert cli.main(["-q", "train", "--run", str(run), *args]) == 0
    return data, run, [_recipe_of(run, args) for args in (SEED_TTA, LINEAR, SEED_POOLED)]


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# item 5
@pytest.mark.slow
def test_predict_without_tta_averages_the_original_views_models_only(trained):
    from transfer_ensemble import predict

    _, run, names = trained
    model = predict.Run.load(run, heads_name=names[0])
    assert set(model.models) == set(VIEWS) and model.recipe.config.tta
    from dataclasses import replace

    originals_only = replace(model.scorer, models={"original": model.models["original"]})
    x = {"original": np.random.default_rng(0).normal(size=(4, 2048)).astype(np.float32)}
    np.testing.assert_allclose(model.scorer.combine(x), originals_only.combine(x))
    assert model.scorer.models_scoring(["original"]) == len(model.models["original"])
    np.testing.assert_allclose(model.predict([np.zeros((80, 80, 3), np.uint8)], tta=False),
                               originals_only.combine({"original": model.extractor.forward(
                                   model.extractor.specs[0], np.zeros((1, TINY, TINY, 3), np.uint8))["original"]}),
                               atol=1e-6)


# item 6
@pytest.mark.slow
def test_predict_heads_best_is_a_blend_when_it_scores_lowest(trained, tmp_path):
    from transfer_ensemble import predict, workflow
    from transfer_ensemble.runfolder import RunFolder

    _, run, names = trained
    run = _copy(run, tmp_path)
    result = workflow.blend(run, names[:2])
    metrics_path = blend_folder(RunFolder(run), names[:2]) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["oof"]["ensemble"]["log_loss"] = 0.0  # the blend is the best by OOF log loss
    metrics_path.write_text(json.dumps(metrics))
    for name in ("best", result.recipe):
        loaded = predict.Run.load(run, heads_name=name)
        assert isinstance(loaded, predict.BlendRun) and loaded.blend.name == result.recipe
        assert [part.recipe.name for part in loaded.parts] == names[:2]


# item 8
@pytest.mark.slow
def test_class_names_with_dollars_are_plotted_as_written(trained, tmp_path):
    from transfer_ensemble import report

    _, run, names = trained
    run = _copy(run, tmp_path)
    dataset = json.loads((run / "dataset.json").read_text())
    dataset["classes"] = ["cost_$1_$2", "a$b$c", "$x^2$ and $"]
    (run / "dataset.json").write_text(json.dumps(dataset))
    for name in names[:2]:
        assert report.rebuild(run, name).exists()
    assert "cost_$1_$2" in (run / "report.html").read_text()


# item 17
@pytest.mark.slow
def test_a_rebuilt_report_holds_only_its_own_images(trained, tmp_path):
    from transfer_ensemble import report

    _, run, names = trained
    run = _copy(run, tmp_path)
    report.rebuild(run, names[1])
    assert (run / "report" / "inner_search.png").exists()  # the linear recipe's report
    report.rebuild(run, names[0])
    page = (run / "report.html").read_text()
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert "inner_search.png" not in pngs and pngs and all(f'data-file="{name}"' in page for name in pngs)


# item 9
@pytest.mark.slow
@pytest.mark.parametrize("chosen", ["bogus", "torch"])
def test_a_backend_that_is_not_installed_is_refused_before_any_folder_is_made(tmp_path, chosen):
    if chosen == "torch" and util.find_spec("torch") is not None:
        pytest.skip("torch is installed here, so KERAS_BACKEND=torch is a valid choice")
    data = make_kaggle(tmp_path / "data")
    result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), *EXTRACT,
                     env={"KERAS_BACKEND": chosen})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"KERAS_BACKEND={chosen}" in result.stderr and "tensorflow" in result.stderr
    assert "keras.json" in result.stderr
    assert not (tmp_path / "run").exists()


# item 1
def _submit_into(run: Path, out: str, **streams) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "transfer_ensemble", "submit", "--run", str(run), "--out", out],
                          env=env, text=True, timeout=600, **streams)


@pytest.mark.slow
def test_out_dev_stdout_appends_to_the_redirected_file_and_keeps_the_summary_off_it(trained, tmp_path):
    _, run, _ = trained
    reference = tmp_path / "reference.csv"
    assert _submit_into(run, str(reference), capture_output=True).returncode == 0
    log_file = tmp_path / "out.log"
    log_file.write_text("earlier line\n")
    inode = log_file.stat().st_ino
    with open(log_file, "a") as f:
        result = _submit_into(run, "/dev/stdout", stdout=f, stderr=subprocess.PIPE)
    assert result.returncode == 0, result.stderr
    assert log_file.stat().st_ino == inode
    assert log_file.read_text() == "earlier line\n" + reference.read_text()
    assert "wrote /dev/stdout" in result.stderr


@pytest.mark.slow
def test_out_dev_stdout_into_a_pipe_and_dev_stderr_get_the_csv(trained, tmp_path):
    _, run, _ = trained
    reference = tmp_path / "reference.csv"
    assert _submit_into(run, str(reference), capture_output=True).returncode == 0
    piped = _submit_into(run, "/dev/stdout", capture_output=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == reference.read_text()
    to_stderr = _submit_into(run, "/dev/stderr", capture_output=True)
    assert to_stderr.returncode == 0, to_stderr.stderr
    assert reference.read_text() in to_stderr.stderr and "wrote /dev/stderr" in to_stderr.stdout


@pytest.mark.slow
def test_predict_out_dev_stdout_writes_only_the_csv_there(trained, tmp_path):
    data, run, names = trained
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "transfer_ensemble", "predict", "--run", str(run), "--images",
                             str(data / "test"), "--out", "/dev/stdout", "--heads", names[1]],
                            env=env, text=True, timeout=600, capture_output=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split(",")[0] == "image" and len(lines) == 6
    assert "wrote /dev/stdout" in result.stderr


# item 2
class _Killed(Exception):
    pass


@pytest.mark.slow
def test_train_and_submit_refuse_stores_an_unfinished_extract_rewrote(trained, tmp_path, monkeypatch, capsys):
    from transfer_ensemble.runfolder import RunFolder

    data, run, names = trained
    run = _copy(run, tmp_path)
    config_before = (run / "config.json").read_text()

    def killed(self, **sections):
        raise _Killed  # stopped once the stores were rewritten, before the record

    with monkeypatch.context() as patch:
        patch.setattr(RunFolder, "update_config", killed)
        with pytest.raises(_Killed):
            cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT, "--image-size", "76"])
    assert (run / "config.json").read_text() == config_before
    capsys.readouterr()
    assert cli.main(["train", "--run", str(run), *LINEAR]) == 2
    err = capsys.readouterr().err
    assert "finish the extract" in err.lower() and "image_size" in err
    assert cli.main(["submit", "--run", str(run), "--out", str(tmp_path / "sub.csv"), "--heads", names[1]]) == 2
    assert "finish the extract" in capsys.readouterr().err.lower()
    assert not (tmp_path / "sub.csv").exists()


# item 10
@pytest.mark.slow
def test_a_blend_of_long_recipe_names_gets_a_folder_name_within_file_system_limits(trained, tmp_path, capsys):
    from transfer_ensemble import workflow
    from transfer_ensemble.recipes import Blend
    from transfer_ensemble.runfolder import RunFolder

    _, run, names = trained
    run = _copy(run, tmp_path)
    full = "blend-" + "+".join(names)
    assert len(full.encode()) > 255
    result = workflow.blend(run, names)
    assert result.recipe == full
    folders = [p.name for p in RunFolder(run).heads_dir.iterdir()]
    assert all(len(name.encode()) <= 255 for name in folders) and set(names) <= set(folders)
    assert json.loads((RunFolder(run).heads_dir / next(n for n in folders if n.startswith("blend-"))
                       / "blend.json").read_text())["name"] == full
    selected = select_recipe(RunFolder(run), full)
    assert isinstance(selected, Blend) and selected.name == full
    assert cli.main(["submit", "--run", str(run), "--out", str(tmp_path / "sub.csv")]) == 0
    assert full in capsys.readouterr().out


# item 10
def test_folder_names_keep_short_names_and_shorten_long_ones_distinctly():
    from transfer_ensemble.recipes import folder_name

    assert folder_name("seed-folds2-tta") == "seed-folds2-tta"  # the names runs have now are kept
    long_a, long_b = "blend-" + "é" * 200 + "+a", "blend-" + "é" * 200 + "+b"
    a, b = folder_name(long_a), folder_name(long_b)
    assert a != b and a.startswith("blend-éé") and len(a.encode()) <= 255 and len(b.encode()) <= 255

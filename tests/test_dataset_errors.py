"""Each problem of a data folder: exit code 2, one paragraph naming the file and the fix, no traceback.

Most checks run `transfer_ensemble.cli.main` in this process: they fail before any model is built.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_folders, make_kaggle, run_cli
from transfer_ensemble import cli, features

EXTRACT = ["--weights", "random", "--image-size", "75", "--backbones", "xception"]


def extract_error(capsys: pytest.CaptureFixture, data: Path, run: Path) -> str:
    """Run `extract` in-process; assert exit 2 and a one-paragraph message; return that message."""
    code = cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one paragraph: {err!r}"
    return err


def edit_csv(path: Path, change) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame).to_csv(path, index=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_kaggle(tmp_path / "data", n_classes=3, per_class=4, n_test=5)


def test_labels_csv_missing(capsys, data: Path, tmp_path: Path) -> None:
    (data / "labels.csv").unlink()
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"{data / 'labels.csv'} is missing" in err and "header 'id,<label column>'" in err


@pytest.mark.slow
def test_labels_csv_missing_in_a_real_process(data: Path, tmp_path: Path) -> None:
    (data / "labels.csv").unlink()
    result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), *EXTRACT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {data / 'labels.csv'} is missing" in result.stderr


def test_labels_csv_without_id_column(capsys, data: Path, tmp_path: Path) -> None:
    edit_csv(data / "labels.csv", lambda f: f.rename(columns={"id": "image"}))
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"{data / 'labels.csv'} has no 'id' column" in err and "'image'" in err


def test_empty_labels_csv_file(capsys, data: Path, tmp_path: Path) -> None:
    (data / "labels.csv").write_text("")
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"{data / 'labels.csv'} is not a readable CSV file" in err


def test_labelled_id_without_image(capsys, data: Path, tmp_path: Path) -> None:
    (data / "train" / "tr1_2.png").unlink()
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"1 ids of {data / 'labels.csv'} have no image in {data / 'train'}: 'tr1_2'" in err
    assert "remove their rows from labels.csv" in err


def test_duplicate_ids_in_labels(capsys, data: Path, tmp_path: Path) -> None:
    edit_csv(data / "labels.csv", lambda f: pd.concat([f, f.iloc[[2]]]))
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"{data / 'labels.csv'} names the same id more than once: 'tr0_2'" in err


def test_duplicate_ids_in_sample_submission(capsys, data: Path, tmp_path: Path) -> None:
    edit_csv(data / "sample_submission.csv", lambda f: pd.concat([f, f.iloc[[0]]]))
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"{data / 'sample_submission.csv'} names the same id more than once: 'te04'" in err


def test_two_images_with_one_id(capsys, data: Path, tmp_path: Path) -> None:
    shutil.copy(data / "train" / "tr2_1.png", data / "train" / "tr2_1.jpg")
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"{data / 'train'} holds several images with the same id" in err and "tr2_1.jpg and tr2_1.png" in err


def test_class_in_labels_but_not_in_sample_submission(capsys, data: Path, tmp_path: Path) -> None:
    edit_csv(data / "labels.csv", lambda f: f.replace({"breed": {"class_1": "Class_1"}}))
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"The classes of {data / 'labels.csv'} and {data / 'sample_submission.csv'} differ" in err
    assert "classes in labels.csv but not in sample_submission.csv: 'Class_1'" in err
    assert "classes in sample_submission.csv with no training image: 'class_1'" in err


def test_class_in_sample_submission_but_not_in_labels(capsys, data: Path, tmp_path: Path) -> None:
    edit_csv(data / "sample_submission.csv", lambda f: f.assign(class_9="0.25"))
    err = extract_error(capsys, data, tmp_path / "run")
    assert "classes in sample_submission.csv with no training image: 'class_9'" in err
    assert "but not in sample_submission.csv" not in err


def test_sample_ids_differ_from_test_images(capsys, data: Path, tmp_path: Path) -> None:
    (data / "test" / "te02.png").unlink()
    for extra in ("zz1", "zz2"):
        shutil.copy(data / "test" / "te00.png", data / "test" / f"{extra}.png")
    err = extract_error(capsys, data, tmp_path / "run")
    assert (f"The ids of {data / 'sample_submission.csv'} (5) and the images in {data / 'test'} (6) differ: "
            f"1 ids have no image ('te02'), 2 images have no row ('zz1', 'zz2')") in err


def test_many_differences_show_the_first_few(capsys, data: Path, tmp_path: Path) -> None:
    for i in range(8):
        shutil.copy(data / "test" / "te00.png", data / "test" / f"new{i}.png")
    err = extract_error(capsys, data, tmp_path / "run")
    assert "8 images have no row ('new0', 'new1', 'new2', 'new3', 'new4' and 3 more)" in err


def test_empty_train_set(capsys, data: Path, tmp_path: Path) -> None:
    edit_csv(data / "labels.csv", lambda f: f.iloc[:0])
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"The train set of {data} is empty: {data / 'labels.csv'} has a header but no rows" in err


def test_empty_test_set(capsys, data: Path, tmp_path: Path) -> None:
    shutil.rmtree(data / "test")
    (data / "test").mkdir()
    edit_csv(data / "sample_submission.csv", lambda f: f.iloc[:0])
    err = extract_error(capsys, data, tmp_path / "run")
    assert f"The test set of {data} is empty" in err and str(data / "test") in err


def test_empty_test_folder_in_folder_layout(capsys, tmp_path: Path) -> None:
    root = make_folders(tmp_path / "folders", n_test=0, labelled_test=False)
    (root / "test").mkdir()
    err = extract_error(capsys, root, tmp_path / "run")
    assert f"The test set of {root} is empty" in err


def test_empty_class_folder(capsys, tmp_path: Path) -> None:
    root = make_folders(tmp_path / "folders")
    (root / "train" / "kind 9").mkdir()
    err = extract_error(capsys, root, tmp_path / "run")
    assert f"Some classes of {root} have no training image: 'kind 9'" in err


def test_class_with_fewer_images_than_folds(capsys, monkeypatch, tmp_path: Path) -> None:
    """`train --folds 5` on a run whose class has 3 images: names it and suggests --folds 3."""
    data = make_kaggle(tmp_path / "data", n_classes=3, per_class=5, n_test=2)
    labels = pd.read_csv(data / "labels.csv")
    for image_id in ("tr1_0", "tr1_1"):
        (data / "train" / f"{image_id}.png").unlink()
    labels[~labels["id"].isin(["tr1_0", "tr1_1"])].to_csv(data / "labels.csv", index=False)
    run = tmp_path / "run"
    monkeypatch.setattr(features, "extract_split",
                        lambda extractor, split, paths, *a, **k: features.ExtractSummary(split, len(paths), 0, 0, 1.0,
                                                                                         1.0, {}))
    assert cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT]) == 0
    capsys.readouterr()
    code = cli.main(["train", "--run", str(run), "--folds", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"these classes of {data} have fewer: 'class_1' (3 images)" in err
    assert "--folds 3 or lower would work" in err
    assert not (run / "heads").exists()


def test_unlabelled_train_images_give_a_warning(capsys, caplog, data: Path, tmp_path: Path) -> None:
    for name in ("stray a", "stray b"):
        shutil.copy(data / "train" / "tr0_0.png", data / "train" / f"{name}.png")
    (data / "test" / "te00.png").write_text("not an image")  # stops extract before any model
    with caplog.at_level(logging.WARNING):
        code = cli.main(["extract", "--data", str(data), "--run", str(tmp_path / "run"), *EXTRACT])
    assert code == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (f"2 images in {data / 'train'} are not named in labels.csv and are not used: "
            f"'stray a', 'stray b'.") in warnings
    assert "1 images cannot be decoded" in capsys.readouterr().err


def test_test_class_missing_from_train_in_folder_layout(capsys, tmp_path: Path) -> None:
    root = make_folders(tmp_path / "folders")
    shutil.copytree(root / "test" / "kind 0", root / "test" / "kind 7")
    err = extract_error(capsys, root, tmp_path / "run")
    assert f"{root / 'test' / 'kind 7'} is a class that {root / 'train'} does not have" in err


def test_missing_data_folder(capsys, tmp_path: Path) -> None:
    err = extract_error(capsys, tmp_path / "nowhere", tmp_path / "run")
    assert f"The data folder {tmp_path / 'nowhere'} does not exist" in err

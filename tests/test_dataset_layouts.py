import pandas as pd

from conftest import draw, make_folders, make_kaggle, save_rgb
from transfer_ensemble.dataset import load_dataset

import numpy as np


def test_kaggle_layout_takes_classes_and_test_order_from_sample_submission(tmp_path):
    root = make_kaggle(tmp_path, n_classes=3, per_class=2, n_test=4)
    labels = pd.read_csv(root / "labels.csv").rename(columns={"breed": "species"})
    labels.to_csv(root / "labels.csv", index=False)
    data = load_dataset(root)
    assert data.layout == "kaggle"
    assert data.classes == ["class_2", "class_1", "class_0"]
    assert [it.id for it in data.test] == ["te03", "te02", "te01", "te00"]
    assert all(it.path.exists() and it.label is None for it in data.test)
    by_id = {it.id: data.classes[it.label] for it in data.train}
    assert by_id["tr0_1"] == "class_0" and by_id["tr2_0"] == "class_2"
    assert len(data.train) == 6 and not data.test_is_labelled


def test_folder_layout_merges_validation_and_reads_labelled_test(tmp_path):
    root = make_folders(tmp_path, n_classes=3, per_class=3, n_valid=2, n_test=2)
    data = load_dataset(root)
    assert data.layout == "folders"
    assert data.classes == ["kind 0", "kind 1", "kind 2"]
    assert len(data.train) == 3 * (3 + 2)
    assert sum(it.id.startswith("validation/") for it in data.train) == 6
    assert data.test_is_labelled
    assert [it.id for it in data.test] == sorted(it.id for it in data.test)
    assert {data.classes[it.label] for it in data.test if it.id.startswith("t1_")} == {"kind 1"}


def test_folder_layout_with_flat_test_and_any_extension_case(tmp_path):
    root = make_folders(tmp_path, n_classes=2, per_class=2, n_valid=0, n_test=2, labelled_test=False)
    rng = np.random.default_rng(1)
    for name in ("upper.JPG", "b.Jpeg", "c.bmp", "d.webp"):
        save_rgb(root / "test" / name, draw(0, rng))
    (root / "test" / "notes.txt").write_text("not an image")
    data = load_dataset(root)
    assert not data.test_is_labelled
    assert [it.id for it in data.test] == ["b", "c", "d", "t0_0", "t0_1", "t1_0", "t1_1", "upper"]

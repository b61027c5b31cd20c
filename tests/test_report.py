"""The run report: every section, valid embedded PNGs, and the numbers behind the plots.

The run folder here is written by hand in the format `train` leaves (no TensorFlow, so these
tests take seconds); tests/test_predict.py checks that a real `train` writes the report.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import draw, run_cli, save_rgb
from transfer_ensemble import ensemble, report
from transfer_ensemble.blocks import Blocks
from transfer_ensemble.config import SeedOptions, TrainConfig
from transfer_ensemble.recipes import recipe_for, select_recipe, write_recipe
from transfer_ensemble.records import labels_digest
from transfer_ensemble.runfolder import RunFolder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = {"recipes": "Head recipes tried on this run", "loss": "Training and validation loss",
            "scores": "Out-of-fold scores",
            "calibration": "Calibration", "confused": "most confused class pairs",
            "per-class": "Per-class accuracy, worst first", "wrong": "Most confidently wrong training images"}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_run(base: Path, n_classes: int = 25, per_class: int = 8, folds: int = 3, accuracy: float = 0.6,
             seed: int = 0) -> Path:
    """A trained run folder as `train` writes it, with made-up predictions of a given accuracy.

    Feature stores hold their records only (the report reads no features).
    """
    rng = np.random.default_rng(seed)
    data, run = base / "data", RunFolder(base / "run")
    classes = [f"breed_{c:02d}_with_a_long_name" for c in range(n_classes)]
    rows = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            rel = f"train/{name}/img{i}.png"
            save_rgb(data / rel, draw(c, rng))
            rows.append({"id": f"train/{name}/img{i}", "path": rel, "label": c})
    labels = np.array([r["label"] for r in rows])
    _write(run.dataset_path, {"root": str(data), "layout": "folders", "classes": classes, "train": rows,
                              "test": [{"id": "t0", "path": "test/t0.png", "label": None}],
                              "bad_test_ids": []})
    backbones = ["xception", "inception_v3"]
    _write(run.config_path, {"extract": {"backbones": backbones, "weights": "random", "image_size": 75,
                                         "batch_size": 8, "precision": "float32", "seed": 0},
                             "classes": classes, "versions": {"python": "3.11"}})
    for split, ids in (("train", [r["id"] for r in rows]), ("test", ["t0"])):
        for name in backbones:
            _write(run.store(split, name).meta, {"backbone": name, "width": 2048, "weights": "random:seed=0",
                                                 "ids": ids})
            _write(run.store(split, name).keys, [f"{split}{i}" for i in range(len(ids))])
            np.save(run.store(split, name).done, np.ones(len(ids), dtype=bool))
    blocks = Blocks(tuple(backbones))
    inputs = run.feature_inputs(blocks)
    recipe = recipe_for(run, TrainConfig(head="seed", folds=folds, options=SeedOptions(epochs=12, patience=3)),
                        blocks, {"features": inputs["features"], "train": inputs["train"],
                         "labels": labels_digest(labels)})
    write_recipe(recipe)
    assignment = np.arange(len(labels)) % folds
    per_fold = []
    for view in ("original", "flipped"):
        logits = rng.normal(size=(len(labels), n_classes))
        right = rng.random(len(labels)) < accuracy
        logits[np.arange(len(labels)), np.where(right, labels, (labels + 1 + labels % 3) % n_classes)] += 4
        oof = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        np.save(recipe.oof(view), oof.astype(np.float32))
        for fold in range(folds):
            epochs = int(rng.integers(5, 13))
            best = int(rng.integers(1, epochs + 1))
            val = assignment == fold
            score = ensemble.score(labels[val], oof[val])
            _write(recipe.fold(view, fold).history,
                   {"loss": list(np.linspace(2, 0.5, epochs)), "val_loss": list(np.linspace(2.1, 0.8, epochs)),
                    "accuracy": [0.5] * epochs, "val_accuracy": [0.5] * epochs, "best_epoch": best,
                    "epochs_run": epochs, "fold": fold, "view": view, "fold_score": score})
            per_fold.append({"view": view, "fold": fold, "log_loss": score["log_loss"],
                             "accuracy": score["accuracy"], "n": score["n"], "best_epoch": best})
    oofs = [np.load(recipe.oof(v)) for v in ("original", "flipped")]
    _write(recipe.metrics_path, {"oof": {"per_fold": per_fold,
                                         "per_view": {v: ensemble.score(labels, p)
                                                      for v, p in zip(("original", "flipped"), oofs)},
                                         "ensemble": ensemble.score(labels, ensemble.average(oofs))}})
    return run.path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"))
    path = report.write_report(RunFolder(run))
    return run, path.read_text(encoding="utf-8")


def _embedded(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*" data-file="([^"]+)">',
                       page)
    return {name: base64.b64decode(data) for data, name in found}


def test_the_report_has_every_section(built):
    run, page = built
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for section, title in SECTIONS.items():
        assert f'<section id="{section}">' in page and f'href="#{section}"' in page
        assert title in page
    assert "--weights random" in page
    assert "ensemble (OOF)" in page


def test_embedded_images_are_valid_pngs_and_match_the_files(built):
    run, page = built
    embedded = _embedded(page)
    assert set(embedded) == {"loss_curves.png", "calibration.png", "confused_pairs.png",
                             "per_class_accuracy.png", "confidently_wrong.png"}
    assert page.count("<img ") == len(embedded)
    for name, png in embedded.items():
        assert png.startswith(PNG_SIGNATURE), name
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.ndim == 3 and image.shape[2] in (3, 4), name
        assert 150 <= image.shape[0] <= 8000 and 300 <= image.shape[1] <= 2000, (name, image.shape)
        assert image.std() > 0, f"{name} is blank"
        assert (run / "report" / name).read_bytes() == png
    assert not re.search(r'(src|href)="(?!data:|#)', page), "the report must not link to outside files"


def test_tables_hold_the_scores_pairs_and_wrong_images(built):
    run, page = built
    metrics = select_recipe(RunFolder(run)).metrics()
    assert f"{metrics['oof']['ensemble']['log_loss']:.4f}" in page
    for row in metrics["oof"]["per_fold"]:
        assert f"{row['view']}, fold {row['fold']}" in page
    confused = page.split('<section id="confused">')[1].split("</section>")[0]
    assert confused.count("<tr><td>") == 20
    wrong = page.split('<section id="wrong">')[1].split("</section>")[0]
    assert wrong.count("<tr><td>") == report.WRONG_IMAGES
    assert "train/breed_" in wrong


def test_confused_pairs_and_per_class_numbers():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([1, 1, 0, 1, 2, 0, 2, 2])
    probabilities = np.eye(3)[predicted]
    matrix = report.confusion(probabilities, labels, 3)
    assert matrix.tolist() == [[1, 2, 0], [0, 1, 1], [1, 0, 2]]
    assert report.confused_pairs(matrix) == [(0, 1, 2), (1, 2, 1), (2, 0, 1)]
    assert report.confused_pairs(matrix, top=1) == [(0, 1, 2)]


def test_calibration_bins_and_error():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 0])
    cal = report.calibration(probabilities, labels)
    assert cal["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    np.testing.assert_allclose(cal["accuracy"][[5, 9]], [0.5, 0.5])
    np.testing.assert_allclose(cal["confidence"][[5, 9]], [0.55, 0.95])
    assert cal["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.45)


def test_a_perfect_run_says_so_instead_of_empty_plots(tmp_path):
    run = make_run(tmp_path, n_classes=3, per_class=4, folds=2, accuracy=1.0)
    page = report.write_report(RunFolder(run)).read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "no class is confused" in page and "No training image is misclassified" in page
    assert set(_embedded(page)) == {"loss_curves.png", "calibration.png", "per_class_accuracy.png"}


@pytest.mark.slow
def test_report_command_rebuilds_it_and_refuses_an_untrained_folder(tmp_path):
    run = make_run(tmp_path, n_classes=4, per_class=4, folds=2)
    result = run_cli("report", "--run", str(run))
    assert result.returncode == 0, result.stderr
    assert f"wrote {run / 'report.html'}" in result.stdout
    assert (run / "report.html").exists() and (run / "report" / "loss_curves.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("report", "--run", str(empty))
    assert result.returncode == 2
    assert "is not a run folder" in result.stderr and "Traceback" not in result.stderr
    shutil.rmtree(RunFolder(run).heads_dir)
    result = run_cli("report", "--run", str(run))
    assert result.returncode == 2
    assert "has no trained heads" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_predict_and_report_modules_do_not_import_tensorflow():
    code = ("import sys, transfer_ensemble.cli, transfer_ensemble.predict, transfer_ensemble.report; "
            "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_regularisation_plot_labels_its_log_scale_ticks_as_plain_numbers(monkeypatch):
    """The report turns maths parsing off (class names are text), so a log axis must not use
    matplotlib's mathtext tick labels, which would print as `$\\mathdefault{10^{-3}}$`."""
    import matplotlib
    from types import SimpleNamespace

    figures = []
    monkeypatch.setattr(report, "_png", lambda figure: figures.append(figure) or PNG_SIGNATURE)
    history = SimpleNamespace(search={"0.001": 1.1, "0.1": 0.8, "10.0": 0.9, "1000.0": 1.0}, chosen={"C": 0.1},
                              iterations=7, note="")
    with matplotlib.rc_context({"text.parse_math": False}):
        report._search_section(SimpleNamespace(histories={"pooled": [history]}), "C")
        figures[0].canvas.draw()
        axis = figures[0].axes[0].xaxis
        labels = [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]
    assert labels and not any("$" in label or "mathdefault" in label for label in labels), labels
    assert {"0.001", "0.1", "10", "1000"} <= set(labels), labels

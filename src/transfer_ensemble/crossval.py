"""Stratified K-fold training of one head per view and fold, resumable fold by fold.

``heads/<view>/fold<k>/`` holds ``model.keras``, ``val_index.npy``, ``val_pred.npy``,
``test_pred.npy`` and ``history.json``; ``done.json`` is written last, so a fold with it is
complete and is never retrained while ``heads/fingerprint.json`` (options, the training
features' identity and content, labels) still matches. ``done.json`` also records a digest of the
test features its ``test_pred.npy`` was computed from: when the test images change, finished
folds only predict the new test set again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transfer_ensemble import ensemble, heads
from transfer_ensemble.features import VIEWS
from transfer_ensemble.storage import atomic_path, read_json, write_json, write_npy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    folds: int = 5
    seed: int = 0
    head: heads.HeadConfig = heads.HeadConfig()

    def to_json(self) -> dict:
        return {"folds": self.folds, "seed": self.seed, **asdict(self.head)}

    @classmethod
    def from_json(cls, obj: dict) -> "TrainConfig":
        head_keys = heads.HeadConfig.__dataclass_fields__
        return cls(obj["folds"], obj["seed"], heads.HeadConfig(**{k: obj[k] for k in head_keys if k in obj}))


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index of every training example: stratified by class, fixed by `seed`."""
    from sklearn.model_selection import StratifiedKFold

    assignment = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        assignment[val] = k
    return assignment


def fold_dir(heads_dir: Path, view: str, fold: int) -> Path:
    return heads_dir / view / f"fold{fold}"


def _fingerprint(config: TrainConfig, labels: np.ndarray, feature_identity: dict, train_digest: str) -> str:
    payload = json.dumps({"train": config.to_json(), "features": feature_identity,
                          "train_features": train_digest,
                          "labels": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def features_digest(features: dict[str, dict[str, np.ndarray]], split: str) -> str:
    """SHA-256 of one split's feature matrices (both views), shapes included."""
    digest = hashlib.sha256()
    for view in VIEWS:
        array = np.ascontiguousarray(features[view][split], dtype=np.float32)
        digest.update(repr(array.shape).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _prepare_heads_dir(heads_dir: Path, fingerprint: str) -> None:
    marker = heads_dir / "fingerprint.json"
    if marker.exists() and read_json(marker).get("fingerprint") == fingerprint:
        return
    if heads_dir.exists():
        log.info("training options or features changed: discarding the previous fold models")
        shutil.rmtree(heads_dir)
    write_json(marker, {"fingerprint": fingerprint})


def train_all(heads_dir: Path, features: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
              n_classes: int, config: TrainConfig, feature_identity: dict) -> dict:
    """Train every (view, fold) head not already done; returns OOF predictions per view.

    `features[view]` holds the ``train`` and ``test`` matrices of that view.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    train_digest = features_digest(features, "train")
    test_digest = features_digest(features, "test")
    _prepare_heads_dir(heads_dir, _fingerprint(config, labels, feature_identity, train_digest))
    assignment = fold_assignment(labels, config.folds, config.seed)
    jobs = [(v, k) for v in VIEWS for k in range(config.folds)]
    todo = [(v, k) for v, k in jobs if not (fold_dir(heads_dir, v, k) / "done.json").exists()]
    if len(todo) < len(jobs):
        log.info("reusing %d finished fold models; training %d", len(jobs) - len(todo), len(todo))
    stale = [(v, k) for v, k in jobs if (v, k) not in todo
             and read_json(fold_dir(heads_dir, v, k) / "done.json").get("test_features") != test_digest]
    if stale:
        log.info("the test features changed: predicting them again with %d finished fold models", len(stale))
    for view, fold in stale:
        _predict_test_again(heads_dir, view, fold, features[view]["test"], n_classes, test_digest)
    for view, fold in tqdm(todo, desc="train heads", unit="model", dynamic_ncols=True):
        _train_fold(heads_dir, view, fold, features[view], labels, assignment, n_classes, config, test_digest)

    oof = {}
    for view in VIEWS:
        pred = np.zeros((len(labels), n_classes), dtype=np.float32)
        for fold in range(config.folds):
            folder = fold_dir(heads_dir, view, fold)
            pred[np.load(folder / "val_index.npy")] = np.load(folder / "val_pred.npy")
        oof[view] = pred
        write_npy(heads_dir / f"oof_{view}.npy", pred)
    return oof


def _test_prediction(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, n_classes), dtype=np.float32)
    return heads.predict(model, x)


def _predict_test_again(heads_dir: Path, view: str, fold: int, x_test: np.ndarray, n_classes: int,
                        test_digest: str) -> None:
    import keras

    folder = fold_dir(heads_dir, view, fold)
    model = keras.saving.load_model(folder / "model.keras")
    write_npy(folder / "test_pred.npy", _test_prediction(model, x_test, n_classes))
    write_json(folder / "done.json", {"fold": fold, "view": view, "test_features": test_digest})


def _train_fold(heads_dir: Path, view: str, fold: int, data: dict[str, np.ndarray], labels: np.ndarray,
                assignment: np.ndarray, n_classes: int, config: TrainConfig, test_digest: str) -> None:
    folder = fold_dir(heads_dir, view, fold)
    if folder.exists():
        shutil.rmtree(folder)  # what a killed attempt left: partial files and temporary names
    train_idx = np.flatnonzero(assignment != fold)
    val_idx = np.flatnonzero(assignment == fold)
    x = data["train"]
    seed = config.seed * 1000 + VIEWS.index(view) * 100 + fold
    model, history = heads.fit_head(x[train_idx], labels[train_idx], x[val_idx], labels[val_idx],
                                    n_classes, config.head, seed)
    val_pred = heads.predict(model, x[val_idx])
    history["fold"] = fold
    history["view"] = view
    history["fold_score"] = ensemble.score(labels[val_idx], val_pred)
    with atomic_path(folder / "model.keras", suffix=".keras") as tmp:
        model.save(tmp)
    write_npy(folder / "val_index.npy", val_idx)
    write_npy(folder / "val_pred.npy", val_pred)
    write_npy(folder / "test_pred.npy", _test_prediction(model, data["test"], n_classes))
    write_json(folder / "history.json", history)
    write_json(folder / "done.json", {"fold": fold, "view": view, "test_features": test_digest})
    log.info("%s fold %d: val log loss %.4f, accuracy %.3f, best epoch %d of %d", view, fold,
             history["fold_score"]["log_loss"], history["fold_score"]["accuracy"], history["best_epoch"], history["epochs_run"])


def test_predictions(heads_dir: Path, folds: int) -> dict[str, list[np.ndarray]]:
    """Each fold model's test predictions, per view."""
    out = {}
    for view in VIEWS:
        out[view] = []
        for fold in range(folds):
            path = fold_dir(heads_dir, view, fold) / "test_pred.npy"
            out[view].append(np.load(path))
    return out


def oof_metrics(heads_dir: Path, oof: dict[str, np.ndarray], labels: np.ndarray, folds: int) -> dict:
    """Log loss and accuracy per fold and view, per view over all OOF rows, and of the view average."""
    table = {"per_fold": [], "per_view": {}, "ensemble": None}
    for view in VIEWS:
        for fold in range(folds):
            history = read_json(fold_dir(heads_dir, view, fold) / "history.json")
            table["per_fold"].append({"view": view, "fold": fold, **history["fold_score"],
                                      "best_epoch": history["best_epoch"]})
        table["per_view"][view] = ensemble.score(labels, oof[view])
    table["ensemble"] = ensemble.score(labels, ensemble.average([oof[v] for v in VIEWS]))
    return table

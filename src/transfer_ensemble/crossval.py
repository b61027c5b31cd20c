"""Stratified K-fold training of one head per view and fold, for one recipe, resumable fold by fold.

A fold whose files are complete and whose recipe was trained on the current features and labels
is never retrained. A fold whose test predictions were made from other test features only
predicts the test set again; a damaged fold (any file missing, truncated or inconsistent) is
said so and trained again. A recipe's paths and records come from `recipes`, the run's from
`runfolder`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from transfer_ensemble import ensemble, heads, progress, views
from transfer_ensemble.config import TrainConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.recipes import FoldFiles, Recipe, write_recipe
from transfer_ensemble.records import DamagedFile, load_json, load_npy
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.storage import atomic_path, write_json, write_npy

log = logging.getLogger(__name__)

TEST_CHANGED = "the test features changed"


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _write_done(files: FoldFiles, view: str, fold: int, kind: heads.HeadEntry, test_identity: str) -> None:
    """Mark a fold complete: the model it saved (by hash) and the test features it predicted."""
    write_json(files.done, {"fold": fold, "view": view, "test_features": test_identity,
                            "model_sha256": _file_sha256(files.model(kind.suffix))})


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index of every training example: stratified by class, fixed by `seed`."""
    from sklearn.model_selection import StratifiedKFold

    assignment = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        assignment[val] = k
    return assignment


def fold_seed(seed: int, group: str, fold: int) -> int:
    """The seed of one fold model: ``seed*1000 + offset*100 + fold`` with the group's fixed offset
    (``views.seed_offset``), so adding a view changes no seed; kept below 2**32 (config.MAX_SEED
    does that for the first offsets on its own)."""
    return (seed * 1000 + views.seed_offset(group) * 100 + fold) % 2**32


def _prepare_recipe(run: RunFolder, recipe: Recipe) -> None:
    """Start or resume `recipe`: discard its folds if they were trained on other inputs."""
    if recipe.folder.exists():
        try:
            recorded = load_json(recipe.record_path)
            same = recorded.get("inputs") == recipe.inputs \
                and TrainConfig.from_json(recorded.get("config"), str(recipe.record_path)) == recipe.config
            why = "the features or labels changed since it was trained"
        except (DamagedFile, UserError) as exc:
            same, why = False, str(exc)
        if not same:
            log.info("head recipe %s: %s; training it again", recipe.name, why)
            shutil.rmtree(recipe.folder)
    recipe.metrics_path.unlink(missing_ok=True)  # until every fold is done again
    write_recipe(recipe)


def _fold_state(files: FoldFiles, kind: heads.HeadEntry, val_idx: np.ndarray, n_test: int, n_classes: int,
                test_identity: str) -> tuple[str, str]:
    """("done" | "predict" | "train", why): what a fold needs."""
    if not files.done.exists():
        return "train", "" if not files.folder.exists() else "an interrupted attempt"
    try:
        done = load_json(files.done)
        if done.get("model_sha256") != _file_sha256(files.model(kind.suffix)):
            raise DamagedFile(files.model(kind.suffix), "is missing or not the model this fold saved")
        if not np.array_equal(load_npy(files.val_index, (None,)), val_idx):
            raise DamagedFile(files.val_index, "does not hold this fold's validation rows")
        load_npy(files.val_pred, (len(val_idx), n_classes), np.float32)
        load_json(files.history)
    except DamagedFile as exc:
        return "train", str(exc)
    if done.get("test_features") != test_identity:
        return "predict", TEST_CHANGED
    try:
        load_npy(files.test_pred, (n_test, n_classes), np.float32)
    except DamagedFile as exc:
        return "predict", str(exc)
    return "done", ""


def train_recipe(run: RunFolder, recipe: Recipe, features: dict[str, dict[str, np.ndarray]],
                 labels: np.ndarray, n_classes: int, test_identity: str) -> dict[str, np.ndarray]:
    """Train every (view, fold) head of `recipe` not already done; returns OOF predictions per view.

    `features[view]` holds the ``train`` and ``test`` matrices of that view.
    """
    _prepare_recipe(run, recipe)
    config = recipe.config
    kind = heads.get(config.head)
    assignment = fold_assignment(labels, config.folds, config.seed)
    n_test = len(features[recipe.views[0]]["test"])
    states = {job: _fold_state(recipe.fold(*job), kind, np.flatnonzero(assignment == job[1]), n_test,
                               n_classes, test_identity) for job in recipe.jobs}
    for (view, fold), (state, why) in states.items():
        if state != "done" and why and why != TEST_CHANGED:
            verb = "training it again" if state == "train" else "predicting the test set again"
            log.warning("%s: %s fold %d: %s; %s", recipe.name, view, fold, why, verb)
    changed = sum(why == TEST_CHANGED for _, why in states.values())
    if changed:
        log.info("%s: %s: predicting them again with %d finished fold models", recipe.name, TEST_CHANGED, changed)
    todo = [job for job, (state, _) in states.items() if state == "train"]
    if len(todo) < len(states):
        log.info("%s: reusing %d finished fold models; training %d", recipe.name, len(states) - len(todo),
                 len(todo))
    test = {view: features[view]["test"] for view in recipe.views}
    for group, fold in (job for job, (state, _) in states.items() if state == "predict"):
        files = recipe.fold(group, fold)
        model = kind.load(files.model(kind.suffix))
        write_npy(files.test_pred, heads.score(model, test, recipe.scored_views(group)))
        _write_done(files, group, fold, kind, test_identity)
    for group, fold in progress.bar(todo, desc=f"train heads [{recipe.name}]", unit="model"):
        _train_fold(recipe, kind, group, fold, features, labels, assignment, n_classes, test_identity)

    oof = {}
    for group in recipe.groups:
        pred = np.zeros((len(labels), n_classes), dtype=np.float32)
        for fold in range(config.folds):
            files = recipe.fold(group, fold)
            pred[np.load(files.val_index)] = np.load(files.val_pred)
        oof[group] = pred
        write_npy(recipe.oof(group), pred)
    return oof


def _train_fold(recipe: Recipe, kind: heads.HeadEntry, group: str, fold: int,
                features: dict[str, dict[str, np.ndarray]], labels: np.ndarray, assignment: np.ndarray,
                n_classes: int, test_identity: str) -> None:
    files = recipe.fold(group, fold)
    if files.folder.exists():
        shutil.rmtree(files.folder)  # what a killed or damaged attempt left
    train_idx = np.flatnonzero(assignment != fold)
    val_idx = np.flatnonzero(assignment == fold)
    views = recipe.train_views(group)
    model = kind.create(recipe.config.options, n_classes)
    report = model.fit([features[v]["train"][train_idx] for v in views], labels[train_idx],
                       [features[v]["train"][val_idx] for v in views], labels[val_idx],
                       fold_seed(recipe.config.seed, group, fold))
    scored = recipe.scored_views(group)
    val_pred = heads.score(model, {v: features[v]["train"][val_idx] for v in scored}, scored)
    history = {**report.to_json(), "fold": fold, "view": group,
               "fold_score": ensemble.score(labels[val_idx], val_pred)}
    with atomic_path(files.model(kind.suffix), suffix=kind.suffix) as tmp:
        model.save(tmp)
    write_npy(files.val_index, val_idx)
    write_npy(files.val_pred, val_pred)
    write_npy(files.test_pred, heads.score(model, {v: features[v]["test"] for v in scored}, scored))
    write_json(files.history, history)
    _write_done(files, group, fold, kind, test_identity)
    log.info("%s fold %d: val log loss %.4f, accuracy %.3f, %s", group, fold,
             history["fold_score"]["log_loss"], history["fold_score"]["accuracy"], report.summary)


def oof_probabilities(recipe: Recipe, n: int, n_classes: int) -> np.ndarray:
    """A finished recipe's OOF ensemble, calibrated as its submission is (DamagedFile if unreadable)."""
    return ensemble.combine({g: [load_npy(recipe.oof(g), (n, n_classes))] for g in recipe.groups},
                            recipe.temperature)


def oof_metrics(recipe: Recipe, oof: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """Log loss and accuracy per fold and view, per view over all OOF rows, and of the ensemble."""
    table = {"per_fold": [], "per_view": {}, "ensemble": None}
    for view, fold in recipe.jobs:
        history = load_json(recipe.fold(view, fold).history)
        report = heads.FitReport.from_history(history)
        table["per_fold"].append({"view": view, "fold": fold, **history["fold_score"],
                                  "summary": report.summary, "chosen": report.chosen})
    for group in recipe.groups:
        table["per_view"][group] = ensemble.score(labels, oof[group])
    table["ensemble"] = ensemble.score(labels, ensemble.combine({group: [oof[group]] for group in recipe.groups}))
    return table


def training_warnings(name: str, oof_log_loss: float, n_classes: int,
                      reports: "list[heads.FitReport | dict]", epochs: int | None) -> list[str]:
    """What a user should know about a finished recipe: heads that learned nothing, or that every
    fold model was stopped by the epoch cap rather than by early stopping. `reports`: each fold
    model's FitReport (or its history.json)."""
    reports = [r if isinstance(r, heads.FitReport) else heads.FitReport.from_history(r) for r in reports]
    out = []
    chance = math.log(n_classes) if n_classes > 1 else 0.0
    if n_classes > 1 and oof_log_loss >= 0.95 * chance:
        out.append(f"The heads of recipe {name} learned almost nothing: their out-of-fold log loss "
                   f"{oof_log_loss:.4f} is near ln({n_classes}) = {chance:.4f}, what predicting the class "
                   f"frequencies scores. Check the labels and the features (--weights random gives "
                   f"meaningless ones)"
                   + (", or train longer (--epochs) or faster (--learning-rate)." if epochs is not None else "."))
    if reports and epochs is not None and all(r.epochs_run == epochs for r in reports):
        out.append(f"Every fold model of recipe {name} ran all {epochs} epochs: early stopping never "
                   f"stopped one, so the validation loss may still have been falling. Raise --epochs.")
    return out

"""Kinds of head: each fits a classifier on one fold's features, predicts, saves and loads itself.

`HEADS` maps the name `--head` takes to a `HeadKind`. Cross-validation, `predict` and the report
use only this interface, so a new kind of head is one entry here and its options in config.py.

`fit` receives the training rows of one or more views (a list of matrices over the same images,
so a head can keep an image's views together) and the validation rows, which only the seed head
looks at (for early stopping, as the paper does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from transfer_ensemble import ensemble
from transfer_ensemble.config import HEAD_KINDS, LinearOptions, SeedOptions

Views = Sequence[np.ndarray]


@dataclass(frozen=True)
class HeadKind:
    """One kind of head. `fit` returns the model and its history (per-epoch curves, chosen settings)."""

    name: str
    suffix: str
    fit: Callable[[Views, np.ndarray, Views, np.ndarray, int, Any, int], tuple[Any, dict]]
    predict: Callable[[Any, np.ndarray], np.ndarray]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]


def _build_seed_head(n_features: int, n_classes: int, options: SeedOptions):
    import keras

    model = keras.Sequential([
        keras.Input(shape=(n_features,)),
        keras.layers.Dropout(options.dropout),
        keras.layers.Dense(n_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(options.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _fit_seed_head(train: Views, y_train: np.ndarray, val: Views, y_val: np.ndarray, n_classes: int,
                   options: SeedOptions, seed: int):
    """The paper's head: dropout then a dense softmax, Adam, early stopping on the validation
    loss with the best weights restored. Deterministic for a given seed. Several views are
    trained on as more rows."""
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    x_train, x_val = np.concatenate(train), np.concatenate(val)
    y_train, y_val = np.tile(y_train, len(train)), np.tile(y_val, len(val))
    model = _build_seed_head(x_train.shape[1], n_classes, options)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                         restore_best_weights=True)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=options.epochs,
                        batch_size=options.batch_size, callbacks=[stop], shuffle=True, verbose=0)
    curves = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    curves["best_epoch"] = int(np.argmin(curves["val_loss"])) + 1
    curves["epochs_run"] = len(curves["val_loss"])
    return model, curves


def _predict_keras(model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def _save_keras(model, path: Path) -> None:
    model.save(path)


def _load_keras(path: Path):
    import keras

    return keras.saving.load_model(path)


# The linear head.
C_GRID = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Inverse L2 strengths the inner search walks, strongest first (each fit warm-starts the next)."""
INNER_SHARE = 0.2  # of a fold's training images held out by the inner search
MAX_ITER = 300


@dataclass
class LinearHead:
    """A fitted linear head: the feature transform, then softmax(z @ coef.T + intercept)."""

    power: bool
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        z = power_normalise(x) if self.power else np.asarray(x, dtype=np.float32)
        return (z - self.mean) / self.scale


def power_normalise(x: np.ndarray) -> np.ndarray:
    """Signed square root, then each row scaled to unit L2 norm (float32)."""
    z = np.sign(x) * np.sqrt(np.abs(x, dtype=np.float32))
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))))


def _inner_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Training and held-out images of the inner search, stratified; None when a class is too small."""
    from sklearn.model_selection import StratifiedShuffleSplit

    counts = np.bincount(y)
    held = max(int(round(INNER_SHARE * len(y))), int((counts > 0).sum()))
    if counts[counts > 0].min() < 2 or held >= len(y) - int((counts > 0).sum()):
        return None
    split = StratifiedShuffleSplit(n_splits=1, test_size=held, random_state=seed)
    return next(split.split(np.zeros(len(y)), y))


def _fit_linear(train: Views, y_train: np.ndarray, val: Views, y_val: np.ndarray, n_classes: int,
                options: LinearOptions, seed: int):
    """Multinomial logistic regression on the standardised (optionally power-normalised) rows of
    every view given. The L2 strength is the one of `C_GRID` with the lowest log loss on a held-out
    share of the training images (all views of an image on one side); the validation rows are
    not looked at."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n = len(y_train)
    z = np.concatenate([power_normalise(x) if options.power else np.asarray(x, dtype=np.float32) for x in train])
    mean = z.mean(axis=0)
    scale = z.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z -= mean
    z /= scale
    rows = lambda images: (images[None, :] + n * np.arange(len(train))[:, None]).ravel()  # noqa: E731
    y_all = np.tile(y_train, len(train))
    # Classes absent from these rows still get a column (sklearn fits only the classes it sees).
    present = np.unique(y_train)

    def full(model) -> tuple[np.ndarray, np.ndarray]:
        coef = np.zeros((n_classes, z.shape[1]), dtype=np.float64)
        intercept = np.full(n_classes, -30.0 if len(present) < n_classes else 0.0)
        if len(present) == 1:
            intercept[present[0]] = 0.0
            return coef, intercept
        if len(present) == 2 and model.coef_.shape[0] == 1:  # sklearn's binary shape: one row
            coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
        else:
            coef[present], intercept[present] = model.coef_, model.intercept_
        return coef, intercept

    model = LogisticRegression(C=C_GRID[0], max_iter=MAX_ITER, warm_start=True)
    history: dict = {"inner_log_loss": {}}
    split = _inner_split(y_train, seed) if len(present) > 1 else None
    best_c = C_GRID[len(C_GRID) // 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if split is not None:
            inner_train, inner_held = rows(split[0]), rows(split[1])
            best, rises, start = math.inf, 0, None
            for c in C_GRID:
                model.set_params(C=c)
                model.fit(z[inner_train], y_all[inner_train])
                coef, intercept = full(model)
                loss = _log_loss(y_all[inner_held], softmax(z[inner_held] @ coef.T + intercept))
                history["inner_log_loss"][str(c)] = loss
                if loss < best:
                    best, best_c, rises, start = loss, c, 0, (model.coef_.copy(), model.intercept_.copy())
                else:
                    rises += 1
                    if rises == 2:
                        break
            model.coef_, model.intercept_ = start
        else:
            history["inner_search"] = "skipped: a class has fewer than 2 training images"
        model.set_params(C=best_c)
        if len(present) > 1:
            model.fit(z, y_all)
    coef, intercept = full(model)
    history["C"] = best_c
    history["iterations"] = int(np.max(model.n_iter_)) if hasattr(model, "n_iter_") else 0
    head = LinearHead(options.power, mean.astype(np.float32), scale.astype(np.float32),
                      coef.astype(np.float32), intercept.astype(np.float32))
    return head, history


def _predict_linear(head: LinearHead, x: np.ndarray) -> np.ndarray:
    logits = head.transform(np.asarray(x, dtype=np.float32)).astype(np.float64) @ head.coef.T.astype(np.float64)
    return softmax(logits + head.intercept).astype(np.float32)


def _save_linear(head: LinearHead, path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, power=np.array(head.power), mean=head.mean, scale=head.scale, coef=head.coef,
                 intercept=head.intercept)


def _load_linear(path: Path) -> LinearHead:
    with np.load(path, allow_pickle=False) as data:
        return LinearHead(bool(data["power"]), data["mean"], data["scale"], data["coef"], data["intercept"])


HEADS: dict[str, HeadKind] = {
    "seed": HeadKind("seed", ".keras", _fit_seed_head, _predict_keras, _save_keras, _load_keras),
    "linear": HeadKind("linear", ".npz", _fit_linear, _predict_linear, _save_linear, _load_linear),
}
assert tuple(HEADS) == HEAD_KINDS, "config.HEAD_KINDS must list the registered heads"


def get(name: str) -> HeadKind:
    return HEADS[name]


def score(kind: HeadKind, model, x: Mapping[str, np.ndarray], views: Sequence[str]) -> np.ndarray:
    """A model's probabilities for some rows: its prediction for the one view, or the mean of its
    predictions for several (test-time augmentation). `x` maps each view to its rows."""
    if len(views) == 1:
        return kind.predict(model, x[views[0]])
    return ensemble.average([kind.predict(model, x[view]) for view in views]).astype(np.float32)

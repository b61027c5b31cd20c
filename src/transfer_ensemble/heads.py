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

from transfer_ensemble import backend, ensemble
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

    backend.enable_determinism()
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
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
"""Inverse L2 strengths the inner search walks, strongest first (each fit starts from the last)."""
INNER_TOL = 1e-3
INNER_SHARE = 0.2  # of a fold's training images held out by the inner search
MAX_ITER = 200
TOL = 1e-4  # on the largest gradient entry of the mean log loss


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


def fit_multinomial(z: np.ndarray, y: np.ndarray, n_classes: int, c: float, start: np.ndarray | None = None,
                    max_iter: int = MAX_ITER, tol: float = TOL) -> tuple[np.ndarray, int]:
    """Multinomial logistic regression with an L2 penalty on the weights (not the intercepts):
    the objective of scikit-learn's ``LogisticRegression(C=c)`` (the tests check the two agree),
    minimised with L-BFGS on float32 matrix products, several times faster a step than
    scikit-learn 1.9's solver on this 2-core CPU.

    Returns the parameters as one vector (weights (d x k) then intercepts (k)) and the steps taken.
    """
    n, d = z.shape
    rows = np.arange(n)
    onehot = np.zeros((n, n_classes), dtype=np.float32)
    onehot[rows, y] = 1.0
    penalty = 1.0 / (c * n)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[:-n_classes].reshape(d, n_classes).astype(np.float32)
        logits = z @ w
        logits += theta[-n_classes:].astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        sums = logits.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(sums[:, 0]) - np.log(np.maximum(logits[rows, y], 1e-37))))
        logits /= sums
        logits -= onehot
        grad_w = (z.T @ logits).astype(np.float64) / n + penalty * theta[:-n_classes].reshape(d, n_classes)
        loss += 0.5 * penalty * float(np.dot(theta[:-n_classes], theta[:-n_classes]))
        return loss, np.concatenate([grad_w.ravel(), logits.sum(axis=0, dtype=np.float64) / n])

    theta = np.zeros(d * n_classes + n_classes) if start is None else start
    return lbfgs(loss_and_grad, theta, max_iter, tol)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """A vector dot product without BLAS, whose threads cost more than they save on vectors."""
    return float(np.multiply(a, b).sum())


def lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray, max_iter: int, tol: float,
          memory: int = 10) -> tuple[np.ndarray, int]:
    """Minimise a smooth convex `fun` (returning value and gradient) with L-BFGS: the two-loop
    recursion and a backtracking (Armijo) line search. Stops when the largest gradient entry is
    below `tol`, the value stops falling, or after `max_iter` steps. Returns (x, steps taken).

    (SciPy's L-BFGS-B spends ~0.1 s of bookkeeping a step on this machine, more than the
    gradient itself; this loop costs a few vector operations.)
    """
    value, grad = fun(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for step in range(1, max_iter + 1):
        if np.max(np.abs(grad)) < tol:
            return x, step - 1
        direction = -grad
        alphas = []
        for s_k, y_k, rho in reversed(pairs):
            alpha = rho * _dot(s_k, direction)
            direction -= alpha * y_k
            alphas.append(alpha)
        if pairs:
            s_k, y_k, _ = pairs[-1]
            direction *= _dot(s_k, y_k) / _dot(y_k, y_k)
        else:
            direction /= max(1.0, _dot(grad, grad) ** 0.5)
        for (s_k, y_k, rho), alpha in zip(pairs, reversed(alphas)):
            direction += (alpha - rho * _dot(y_k, direction)) * s_k
        slope = float(_dot(grad, direction))
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            direction, slope = -grad, -float(_dot(grad, grad))
        t = 1.0
        for _ in range(30):
            new_x = x + t * direction
            new_value, new_grad = fun(new_x)
            if new_value <= value + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return x, step
        s_k, y_k = new_x - x, new_grad - grad
        sy = float(_dot(s_k, y_k))
        if sy > 1e-12:
            pairs.append((s_k, y_k, 1.0 / sy))
            del pairs[:-memory]
        done = value - new_value <= 1e-10 * max(1.0, abs(value))
        x, value, grad = new_x, new_value, new_grad
        if done:
            return x, step
    return x, max_iter


def _fit_linear(train: Views, y_train: np.ndarray, val: Views, y_val: np.ndarray, n_classes: int,
                options: LinearOptions, seed: int):
    """Multinomial logistic regression on the standardised (optionally power-normalised) rows of
    every view given. The L2 strength is the one of `C_GRID` with the lowest log loss on a held-out
    share of the training images (all views of an image on one side; walked from the strongest,
    each fit starting from the last, stopping once the loss rises); the model is then
    fitted on every training row. The validation rows are not looked at."""
    n = len(y_train)
    z = np.concatenate([power_normalise(x) if options.power else np.asarray(x, dtype=np.float32) for x in train])
    mean = z.mean(axis=0)
    scale = z.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z -= mean
    z /= scale
    y_all = np.tile(y_train, len(train))
    d = z.shape[1]

    def probabilities(theta: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return softmax(z[rows] @ theta[:-n_classes].reshape(d, n_classes) + theta[-n_classes:])

    history: dict = {"inner_log_loss": {}, "iterations": 0}
    split = _inner_split(y_train, seed)
    best_c, theta = C_GRID[len(C_GRID) // 2], None
    if split is not None:
        inner_train, held = (np.concatenate([images + n * v for v in range(len(train))]) for images in split)
        best, current = math.inf, None
        for c in C_GRID:
            current, steps = fit_multinomial(z[inner_train], y_all[inner_train], n_classes, c, current,
                                             tol=INNER_TOL)
            history["iterations"] += steps
            loss = _log_loss(y_all[held], probabilities(current, held))
            history["inner_log_loss"][str(c)] = loss
            if loss < best:
                best, best_c, theta = loss, c, current
            else:
                break  # the held-out loss is unimodal in C: past its minimum
    else:
        history["inner_search"] = "skipped: a class has fewer than 2 training images"
    theta, steps = fit_multinomial(z, y_all, n_classes, best_c, theta)
    history["iterations"] += steps
    history["C"] = best_c
    head = LinearHead(options.power, mean.astype(np.float32), scale.astype(np.float32),
                      theta[:-n_classes].reshape(d, n_classes).T.astype(np.float32),
                      theta[-n_classes:].astype(np.float32))
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

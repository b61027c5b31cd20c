"""The `linear` head (the default): multinomial logistic regression on standardised features,
its L2 strength chosen by an inner search on each fold's training rows. Saved as ``model.npz``."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer_ensemble.heads.base import FitReport, Views, n_classes_of
from transfer_ensemble.heads.solver import fit_multinomial, log_loss as _log_loss, softmax
from transfer_ensemble.options import boolean, check_self, option

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
"""Inverse L2 strengths the inner search walks, strongest first (each fit starts from the last)."""
INNER_TOL = 1e-3
INNER_SHARE = 0.2  # of a fold's training images held out by the inner search


@dataclass(frozen=True)
class LinearOptions:
    """The `linear` head: multinomial logistic regression on standardised features, its L2
    regularisation chosen by an inner search on the training rows of each fold."""

    power: bool = option(True, "--power", "signed square root and L2 normalisation of the features "
                                          "(default on)", boolean())

    def __post_init__(self) -> None:
        check_self(self)


@dataclass
class LinearModel:
    """A fitted linear head's parameters: the feature transform, then softmax(z @ coef.T + intercept)."""

    power: bool
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        z = power_normalise(x) if self.power else np.array(x, dtype=np.float32)

        def block(rows: slice) -> None:
            z[rows] -= self.mean
            z[rows] /= self.scale

        _each(block, _row_chunks(len(z), 4 * ROW_CHUNK))
        return z


ROW_CHUNK = 256  # rows (of one column block) worked on at a time: small enough to stay in cache
COLUMN_BLOCK = 1024


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _each(work, items) -> None:
    """`work(item)` for every item, on every core (numpy's array loops release the GIL)."""
    items = list(items)
    if len(items) < 2 or _threads() == 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(_threads()) as pool:
        for _ in pool.map(work, items):
            pass


def _row_chunks(n: int, size: int = ROW_CHUNK) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def power_normalise(x: np.ndarray, out: np.ndarray | None = None, take: np.ndarray | None = None) -> np.ndarray:
    """Signed square root, then each row scaled to unit L2 norm (float32), of the rows `take` of
    `x` (all when None), written into `out` (a new array when None), a block of rows at a time on
    every core."""
    x = np.asarray(x)
    n = len(x) if take is None else len(take)
    if out is None:
        out = np.empty((n, x.shape[1]), dtype=np.float32)

    def rows_of(rows: slice) -> np.ndarray:
        return x[rows] if take is None else x[take[rows]]

    if x.dtype.itemsize > 4:  # keep the float64 arithmetic of the one-shot formula
        def block(rows: slice) -> None:
            part = rows_of(rows)
            z = np.sign(part) * np.sqrt(np.abs(part, dtype=np.float32))
            out[rows] = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    else:
        def block(rows: slice) -> None:
            z, part = out[rows], rows_of(rows)
            np.abs(part, out=z, dtype=np.float32)
            norm = np.sqrt(z.sum(axis=1, keepdims=True))  # the L2 norm of sqrt|x| is sqrt(sum |x|)
            np.sqrt(z, out=z)
            np.copysign(z, part, out=z)
            z /= np.maximum(norm, 1e-12)
    _each(block, _row_chunks(n, 4 * ROW_CHUNK))
    return out


def _standardise(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of `z` (those below 1e-6 set to 1), and `z`
    standardised in place: the values of ``z.mean(0)``, ``z.std(0)`` and ``(z - mean) / scale``
    to the bit (numpy sums a column top to bottom; each row chunk continues that sum), without
    their full-size temporaries, one column block per core."""
    n, d = z.shape
    mean = np.empty(d, dtype=np.float32)
    scale = np.empty(d, dtype=np.float32)

    def block(columns: slice) -> None:
        part = z[:, columns]
        m = part.mean(axis=0)
        buf = np.empty((ROW_CHUNK + 1, part.shape[1]), dtype=np.float32)
        total = None
        for rows in _row_chunks(n):
            chunk = part[rows]
            chunk -= m
            k = len(chunk)
            if total is None:
                np.multiply(chunk, chunk, out=buf[:k])
                total = np.add.reduce(buf[:k], axis=0)
            else:
                buf[0] = total
                np.multiply(chunk, chunk, out=buf[1:k + 1])
                total = np.add.reduce(buf[:k + 1], axis=0)
        np.true_divide(total, np.intp(n), out=total, casting="unsafe")  # as np.std divides
        np.sqrt(total, out=total)
        total[total < 1e-6] = 1.0
        for rows in _row_chunks(n):
            part[rows] /= total
        mean[columns], scale[columns] = m, total

    _each(block, _row_chunks(d, COLUMN_BLOCK))
    return mean, scale


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
    share of the training images (all views of an image on one side; walked from the strongest,
    each fit starting from the last, stopping once the loss rises); the model is then
    fitted on every training row. The validation rows are not looked at."""
    n, n_views = len(y_train), len(train)
    split = _inner_split(y_train, seed)
    # Rows are laid out inner-training images first (every view), then the inner held-out ones, so
    # the inner search's two sides are slices of z, not copies; the final fit uses every row.
    sides = [None] if split is None else list(split)  # None: every image, in order
    z = np.empty((n * n_views, np.shape(train[0])[1]), dtype=np.float32)
    labels, start = [], 0
    for images in sides:
        for x in train:
            rows = slice(start, start + (n if images is None else len(images)))
            if options.power:
                power_normalise(x, out=z[rows], take=images)
            else:
                z[rows] = x if images is None else np.asarray(x)[images]
            labels.append(y_train if images is None else y_train[images])
            start = rows.stop
    mean, scale = _standardise(z)
    y_all = np.concatenate(labels)
    d = z.shape[1]

    def probabilities(rows: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """float32 products (as the solver's): a float64 copy of the rows would cost more than the fit."""
        logits = (rows @ theta[:-n_classes].reshape(d, n_classes).astype(np.float32)).astype(np.float64)
        return softmax(logits + theta[-n_classes:])

    history: dict = {"inner_log_loss": {}, "iterations": 0}
    best_c, theta = C_GRID[len(C_GRID) // 2], None
    if split is not None:
        inner = n_views * len(split[0])
        z_inner, y_inner, z_held, y_held = z[:inner], y_all[:inner], z[inner:], y_all[inner:]
        best, current, memo = math.inf, None, {}
        for c in C_GRID:
            current, steps = fit_multinomial(z_inner, y_inner, n_classes, c, current, tol=INNER_TOL, memo=memo)
            history["iterations"] += steps
            loss = _log_loss(y_held, probabilities(z_held, current))
            history["inner_log_loss"][str(c)] = loss
            if loss < best:
                best, best_c, theta = loss, c, current
            else:
                break  # the held-out loss is unimodal in C: past its minimum
        del z_inner, z_held, memo
    else:
        history["inner_search"] = "skipped: a class has fewer than 2 training images"
    theta, steps = fit_multinomial(z, y_all, n_classes, best_c, theta)
    history["iterations"] += steps
    history["C"] = best_c
    head = LinearModel(options.power, mean.astype(np.float32), scale.astype(np.float32),
                       theta[:-n_classes].reshape(d, n_classes).T.astype(np.float32),
                       theta[-n_classes:].astype(np.float32))
    report = FitReport(summary=f"C {best_c}", chosen={"C": best_c}, search=history["inner_log_loss"], searched="C",
                       iterations=history["iterations"], note=history.get("inner_search", ""))
    return head, report


def _predict_linear(head: LinearModel, x: np.ndarray) -> np.ndarray:
    z = head.transform(x)
    logits = (z @ head.coef.T).astype(np.float64)  # float32 products, as in the fit; softmax in float64
    logits += head.intercept
    return softmax(logits).astype(np.float32)


class LinearHead:
    """The linear head as an estimator: ``LinearHead(power=True).fit(...)``, then ``predict_proba``."""

    def __init__(self, power: bool = True, n_classes: int | None = None):
        self.options = LinearOptions(power=power)
        self.n_classes = n_classes
        self.model_: LinearModel | None = None

    def fit(self, train_views: Views, y: np.ndarray, val_views: Views, y_val: np.ndarray, seed: int) -> FitReport:
        self.model_, report = _fit_linear(train_views, y, val_views, y_val, n_classes_of(self.n_classes, y),
                                          self.options, seed)
        return report

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _predict_linear(self.model_, x)

    def save(self, path: Path) -> None:
        head = self.model_
        with open(path, "wb") as f:
            np.savez(f, power=np.array(head.power), mean=head.mean, scale=head.scale, coef=head.coef,
                     intercept=head.intercept)

    @classmethod
    def load(cls, path: Path) -> "LinearHead":
        with np.load(path, allow_pickle=False) as data:
            model = LinearModel(bool(data["power"]), data["mean"], data["scale"], data["coef"], data["intercept"])
        head = cls(power=model.power, n_classes=len(model.intercept))
        head.model_ = model
        return head

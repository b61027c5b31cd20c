"""The ensemble rule (the plain average of the fold models, then the recipe's temperature), the
fitting of that temperature and of blend weights on out-of-fold predictions, and the score."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def average(predictions: Sequence[np.ndarray]) -> np.ndarray:
    """The plain mean of probability matrices, renormalised so each row sums to 1 in float64."""
    mean = np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in predictions]), axis=0)
    return mean / mean.sum(axis=1, keepdims=True)


def combine(per_view: Mapping[str, Sequence[np.ndarray]], temperature: float = 1.0) -> np.ndarray:
    """The ensemble's probabilities: every fold model of every view given, averaged with equal
    weight, then calibrated with `temperature` (1.0 leaves them as they are).

    This one rule makes the submission, the hold-out and OOF scores, and `predict`'s output.
    """
    return calibrate(average([p for predictions in per_view.values() for p in predictions]), temperature)


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident probabilities, T < 1 sharpens them."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-15, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


TEMPERATURE_RANGE = (0.5, 10.0)
MIN_ERRORS = 5
"""Fewer misclassified OOF rows than this leave the temperature at 1: with (almost) none, the OOF
log loss only falls as the probabilities are sharpened, which says nothing about unseen images."""


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature in TEMPERATURE_RANGE minimising the log loss of `probabilities` (out-of-fold
    predictions only); 1 when they misclassify fewer than MIN_ERRORS rows or it would not help."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    if int((np.asarray(probabilities).argmax(axis=1) != labels).sum()) < MIN_ERRORS:
        return 1.0
    logp = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-15, 1.0))

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))

    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x)) if found.fun < loss(0.0) else 1.0


def blend(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of several recipes' probabilities."""
    mixed = sum(w * np.asarray(p, dtype=np.float64) for w, p in zip(weights, parts))
    return mixed / mixed.sum(axis=1, keepdims=True)


def fit_blend_weights(labels: np.ndarray, parts: Sequence[np.ndarray]) -> list[float]:
    """Non-negative weights summing to 1 that minimise the log loss of `blend(parts)` on
    out-of-fold predictions (softmax-parametrised, so the search is unconstrained)."""
    from scipy.optimize import minimize

    labels = np.asarray(labels)
    picked = [np.clip(np.asarray(p, dtype=np.float64)[np.arange(len(labels)), labels], 1e-15, 1.0) for p in parts]
    stacked = np.stack(picked, axis=1)

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        w /= w.sum()
        return float(-np.mean(np.log(stacked @ w)))

    found = minimize(loss, np.zeros(len(parts)), method="Nelder-Mead",
                     options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 400 * len(parts)})
    w = np.exp(found.x - found.x.max())
    return [float(v) for v in w / w.sum()]


def score(y_true: np.ndarray, probabilities: np.ndarray) -> dict:
    """Multi-class log loss (as Kaggle computes it, probabilities clipped) and accuracy."""
    from sklearn.metrics import accuracy_score, log_loss

    p = np.asarray(probabilities, dtype=np.float64)
    p = np.clip(p, 1e-15, 1 - 1e-15)
    p /= p.sum(axis=1, keepdims=True)
    return {
        "log_loss": float(log_loss(y_true, p, labels=np.arange(p.shape[1]))),
        "accuracy": float(accuracy_score(y_true, p.argmax(axis=1))),
        "n": int(len(y_true)),
    }

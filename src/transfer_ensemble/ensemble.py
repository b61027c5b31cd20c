"""The ensemble rule (the plain average of the fold models), and its score: log loss and accuracy."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def average(predictions: Sequence[np.ndarray]) -> np.ndarray:
    """The plain mean of probability matrices, renormalised so each row sums to 1 in float64."""
    mean = np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in predictions]), axis=0)
    return mean / mean.sum(axis=1, keepdims=True)


def combine(per_view: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
    """The ensemble's probabilities: every fold model of every view given, averaged with equal weight.

    This one rule makes the submission, the hold-out and OOF scores, and `predict`'s output.
    """
    return average([p for predictions in per_view.values() for p in predictions])


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

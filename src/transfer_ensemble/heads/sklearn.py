"""Any scikit-learn-style classifier as a head::

    from sklearn.neighbors import KNeighborsClassifier
    from transfer_ensemble import heads
    from transfer_ensemble.heads.sklearn import sklearn_head

    heads.register(sklearn_head("knn", lambda: KNeighborsClassifier(5)))

The classifier is trained on the rows of every view given (the validation rows are not used) and
saved with pickle (``model.pkl``: load only run folders you trust). `options` is an options
dataclass (fields declared with options.option) whose values are passed to `make`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from transfer_ensemble.heads.base import FitReport, HeadEntry, Views, n_classes_of


@dataclass(frozen=True)
class NoOptions:
    """A head without options."""


class SklearnHead:
    """A head around the classifier `make(**params)` builds; columns follow the class indices."""

    make: Callable[..., Any] = None  # set by sklearn_head on a subclass

    def __init__(self, n_classes: int | None = None, **params: Any):
        self.params = params
        self.n_classes = n_classes
        self.model_ = None

    def fit(self, train_views: Views, y: np.ndarray, val_views: Views, y_val: np.ndarray, seed: int) -> FitReport:
        self.n_classes = n_classes_of(self.n_classes, y)
        self.model_ = type(self).make(**self.params).fit(np.concatenate(train_views), np.tile(y, len(train_views)))
        return FitReport(summary=type(self.model_).__name__)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self.n_classes), dtype=np.float32)
        if not len(x):
            return out
        classes = np.asarray(self.model_.classes_)
        if hasattr(self.model_, "predict_proba"):
            out[:, classes] = self.model_.predict_proba(x)
        else:
            out[np.arange(len(x)), self.model_.predict(x)] = 1.0
        return out

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump({"params": self.params, "n_classes": self.n_classes, "model": self.model_}, f)

    @classmethod
    def load(cls, path: Path) -> "SklearnHead":
        with open(path, "rb") as f:
            saved = pickle.load(f)
        head = cls(saved["n_classes"], **saved["params"])
        head.model_ = saved["model"]
        return head


def sklearn_head(name: str, make: Callable[..., Any], options: type = NoOptions,
                 recipe: dict[str, bool] | None = None) -> HeadEntry:
    """A registry entry for the classifiers `make(**options)` builds (recipe defaults: pooled views, TTA,
    calibrated, every scale)."""
    estimator = type(f"SklearnHead_{name}", (SklearnHead,), {"make": staticmethod(make)})
    recipe = recipe or {"multiscale": True, "pool_views": True, "tta": True, "temperature": True}
    assert {f.name for f in fields(options)}.isdisjoint({"n_classes"})
    return HeadEntry(name, estimator, options, ".pkl", recipe, help=f"scikit-learn classifier ({name})")

"""Kinds of head, the only list of them: `HEADS` maps the name ``--head`` takes to its `HeadEntry`.

A head is an estimator (base.Head: ``fit`` -> FitReport, ``predict_proba``, ``save``, ``load``)
with its options dataclass beside it, one file per kind. Cross-validation, ``predict``, the
report, the CLI's per-head option groups, option ownership and recipe defaults all come from
here, so a new kind is one file and one line in `HEADS` (or a `register` call).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from transfer_ensemble import ensemble, plugins
from transfer_ensemble.heads.base import FitReport, Head, HeadEntry
from transfer_ensemble.heads.linear import LinearHead, LinearOptions
from transfer_ensemble.heads.seed import SeedHead, SeedOptions

_PAPER = {"multiscale": False, "select_blocks": False, "pool_views": False, "tta": False, "temperature": False}
_EVERYTHING = {"multiscale": True, "select_blocks": True, "pool_views": True, "tta": True, "temperature": True}

HEADS: dict[str, HeadEntry] = {entry.name: entry for entry in (
    HeadEntry("seed", SeedHead, SeedOptions, ".keras", _PAPER,
              "the paper's dropout + softmax head; --head seed reproduces the paper's submission",
              paper_features=True),
    HeadEntry("linear", LinearHead, LinearOptions, ".npz", _EVERYTHING,
              "logistic regression, its L2 strength chosen by an inner search"),
)}
"""Each entry's `recipe` says how it is trained on the views and scored unless told: the seed's
are the paper's (one model per view, each scoring its own view, no calibration)."""

BUILT_IN = frozenset(HEADS)


def register(entry: HeadEntry, module: str | None = None) -> HeadEntry:
    """Add a kind of head (e.g. heads.sklearn.sklearn_head(...)); its name must be new. `module`
    (default: the caller's) is recorded with the recipes it trains, so other processes can import it."""
    plugins.add("head", HEADS, entry.name, entry, module)
    return entry


def unregister(name: str) -> None:
    plugins.remove("head", HEADS, name, BUILT_IN)


def names() -> tuple[str, ...]:
    return tuple(HEADS)


def get(name: str) -> HeadEntry:
    return HEADS[name]


def score(model: Head, x: Mapping[str, np.ndarray], views: Sequence[str]) -> np.ndarray:
    """A model's probabilities for some rows: its prediction for the one view, or the mean of its
    predictions for several (test-time augmentation). `x` maps each view to its rows."""
    if len(views) == 1:
        return model.predict_proba(x[views[0]])
    return ensemble.average([model.predict_proba(x[view]) for view in views]).astype(np.float32)


__all__ = ["FitReport", "HEADS", "Head", "HeadEntry", "LinearHead", "LinearOptions", "SeedHead", "SeedOptions",
           "get", "names", "register", "score", "unregister"]

"""What every head is: an estimator with `fit`, `predict_proba`, `save` and `load`, and the
`FitReport` its `fit` returns; `HeadEntry` is its line in the registry (heads/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from transfer_ensemble import plugins

Views = Sequence[np.ndarray]


@dataclass(frozen=True)
class FitReport:
    """What one fit chose and how it went; `summary` says it in a few words for any kind of head
    (the CLI's table, the training log, the report)."""

    summary: str = ""
    chosen: dict[str, Any] = field(default_factory=dict)
    """Settings the fit chose itself, by name (the linear head's C)."""
    curves: dict[str, list[float]] = field(default_factory=dict)
    """Per-epoch curves by name (loss, val_loss, accuracy, val_accuracy for the seed head)."""
    search: dict[str, float] = field(default_factory=dict)
    """Held-out log loss of each candidate setting tried (the linear head's inner search, by C)."""
    searched: str = ""
    """The setting `search` is over, as `chosen` names it (the linear head's "C"); "" without a search."""
    best_epoch: int | None = None
    epochs_run: int | None = None
    iterations: int | None = None
    note: str = ""

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_history(cls, history: dict) -> "FitReport":
        """A fold's history.json (or a metrics.json per-fold row) as a FitReport, whichever version
        wrote it: the one reader of the untyped keys that runs written before FitReport hold."""
        if "summary" in history and "chosen" in history:
            report = cls(**{f.name: history[f.name] for f in fields(cls) if f.name in history})
            if not report.searched and report.search and "C" in report.chosen:  # before `searched` was recorded
                report = replace(report, searched="C")
            return report
        curves = {k: list(history[k]) for k in ("loss", "val_loss", "accuracy", "val_accuracy")
                  if isinstance(history.get(k), list)}
        chosen = {"C": history["C"]} if history.get("C") is not None else {}
        best, run = history.get("best_epoch"), history.get("epochs_run")
        if chosen:
            summary = f"C {chosen['C']}"
        elif best is not None:
            summary = f"best epoch {best}" + (f" of {run}" if run is not None else "")
        else:
            summary = ""
        return cls(summary=summary, chosen=chosen, curves=curves, search=dict(history.get("inner_log_loss") or {}),
                   searched="C" if chosen else "", best_epoch=best, epochs_run=run,
                   iterations=history.get("iterations"), note=history.get("inner_search", ""))


class Head(Protocol):
    """A head: its options are its constructor's parameters (plus `n_classes`, else max(y) + 1)."""

    def fit(self, train_views: Views, y: np.ndarray, val_views: Views, y_val: np.ndarray,
            seed: int) -> FitReport:
        """Fit on the rows of one or more views of the same images (`val_views` may be ignored)."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(rows, n_classes) float32 probabilities."""

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> "Head": ...


@dataclass(frozen=True)
class HeadEntry:
    """One kind of head: its `--head` name, estimator class, options dataclass (one field per
    option, see options.py), model file suffix, and the recipe defaults it is trained with."""

    name: str
    estimator: type
    options: type
    suffix: str
    recipe: dict[str, bool]
    """multiscale, select_blocks (default False), pool_views, tta, temperature when not given."""
    help: str = ""
    paper_features: bool = False
    """Its recipes see the paper's feature blocks only (the original and flipped views' final-layer
    features), whatever else the run extracted (`blocks.blocks_for`): the paper's head stays the paper's."""

    def __post_init__(self) -> None:
        plugins.check_name("head", self.name)

    def create(self, options: Any = None, n_classes: int | None = None) -> Head:
        """A new, unfitted head with `options` (an instance of `self.options`; None: the defaults)."""
        options = self.options() if options is None else options
        return self.estimator(**{f.name: getattr(options, f.name) for f in fields(options)}, n_classes=n_classes)

    def load(self, path: Path) -> Head:
        return self.estimator.load(path)


def n_classes_of(n_classes: int | None, *labels: np.ndarray) -> int:
    return n_classes if n_classes is not None else int(max(int(np.max(y)) for y in labels if len(y))) + 1

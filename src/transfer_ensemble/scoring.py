"""Scoring with a head recipe: load its fold models, combine views and folds, apply its temperature.

``Scorer`` holds one recipe's fold models and scores features (rows of the feature stores, or
arrays computed in memory): `predict` and the engines' scoring workers use it. For the run's
own test set the fold models' saved test predictions are combined instead
(``test_probabilities``, ``blend_test_probabilities``): `train`'s holdout scores, `blend` and
`submit` use those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from transfer_ensemble import ensemble, heads
from transfer_ensemble.errors import UserError
from transfer_ensemble.recipes import POOLED, Blend, Recipe, fold_test_predictions, select_recipe
from transfer_ensemble.runfolder import RunData, RunFolder
from transfer_ensemble.store import StoreFiles


@dataclass
class Scorer:
    """A run's head recipe and its fold models, loaded once."""

    run: RunFolder
    recipe: Recipe
    models: dict[str, list] = field(repr=False)

    @classmethod
    def load(cls, run: RunFolder, recipe: Recipe) -> "Scorer":
        return cls(run, recipe, load_models(run, recipe))

    @classmethod
    def open(cls, run_dir: str | Path, heads_name: str) -> "Scorer":
        """The recipe `heads_name` of a run, without the backbones (for scoring workers)."""
        run = RunFolder.existing(run_dir, "predict with")
        return cls.load(run, select_recipe(run, heads_name, "predict", blends=False))

    @property
    def n_models(self) -> int:
        return sum(len(m) for m in self.models.values())

    def scored_groups(self, views: Sequence[str]) -> list[str]:
        """The model groups averaged when the features of `views` are at hand: the models of a view
        not among them are left out (--no-tta: the original view's only), pooled models are kept."""
        return [group for group in self.models if group == POOLED or group in views]

    def models_scoring(self, views: Sequence[str]) -> int:
        """How many fold models `combine` averages given the features of `views`."""
        return sum(len(self.models[group]) for group in self.scored_groups(views))

    def combine(self, x: dict[str, np.ndarray]) -> np.ndarray:
        """The recipe's ensemble for the views in `x`: each model of `scored_groups` scores the views
        it scores in the submission that `x` has, then the temperature."""
        per_group = {}
        for group in self.scored_groups(list(x)):
            views = [v for v in self.recipe.scored_views(group) if v in x]
            if views:
                per_group[group] = [heads.score(model, x, views) for model in self.models[group]]
        return ensemble.combine(per_group, self.recipe.temperature)

    def score_rows(self, stores: Sequence[StoreFiles], start: int, stop: int, tta: bool = True) -> np.ndarray:
        """The recipe's probabilities for rows [start, stop) of the stored features of its blocks, in
        order (`stores`), in the views it scores (the original alone without `tta`)."""
        views = self.recipe.predicted_views(tta)
        x = {view: np.concatenate([read_rows(store.view(view), start, stop) for store in stores], axis=1)
             for view in views}
        return self.combine(x)


def load_models(run: RunFolder, recipe: Recipe) -> dict[str, list]:
    """The recipe's fold models per group; a clear error naming a model file that does not load."""
    kind = heads.get(recipe.config.head)
    models: dict[str, list] = {group: [] for group in recipe.groups}
    for view, fold in recipe.jobs:
        path = recipe.fold(view, fold).model(kind.suffix)
        try:
            models[view].append(kind.load(path))
        except Exception as exc:  # Keras raises many types for a missing or corrupt file.
            raise UserError(f"The fold model {path} cannot be loaded ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}). "
                            f"Run `transfer-ensemble train --run {run.path} --heads {recipe.name}`: it "
                            f"retrains damaged folds.") from None
    return models


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a stored feature array, mapped only while they are copied out."""
    array = np.load(path, mmap_mode="r")
    rows = np.array(array[start:stop], dtype=np.float32)
    del array
    return rows


def class_frequencies(run_data: RunData) -> np.ndarray:
    counts = np.bincount(run_data.labels, minlength=len(run_data.dataset.classes)).astype(np.float64)
    return counts / counts.sum()


def test_probabilities(run: RunFolder, recipe: Recipe, run_data: RunData, test_identity: str,
                       temperature: float | None = None) -> tuple[np.ndarray, dict]:
    """The ensemble's probabilities for every test id, and each view's models combined on their own.

    `temperature` defaults to the recipe's. Test images that did not decode get the training
    class frequencies.
    """
    per_view = fold_test_predictions(run, recipe, len(run_data.good_test), test_identity)
    views = {view: ensemble.combine({view: preds}) for view, preds in per_view.items()}
    full = np.tile(class_frequencies(run_data), (len(run_data.dataset.test), 1))
    bad = set(run_data.bad_test_ids)
    good_rows = [i for i, it in enumerate(run_data.dataset.test) if it.id not in bad]
    full[good_rows] = ensemble.combine(per_view, recipe.temperature if temperature is None else temperature)
    return full, views


def blend_test_probabilities(run: RunFolder, blend: Blend, recipes: list[Recipe], run_data: RunData,
                             temperature: float) -> np.ndarray:
    """A blend's probabilities for every test id: its recipes' mixed with its weights, then `temperature`."""
    parts = [test_probabilities(run, r, run_data, run.feature_inputs(r.blocks)["test"])[0] for r in recipes]
    return mix(blend, parts, temperature)


def mix(blend: Blend, parts: list[np.ndarray], temperature: float | None = None) -> np.ndarray:
    """A blend's probabilities from its parts' (each calibrated as its own submission is): mixed
    with its weights, then its temperature (or `temperature`). The submission and `predict` use it."""
    return ensemble.calibrate(ensemble.blend(parts, blend.weights),
                              blend.temperature if temperature is None else temperature)

"""Choosing a recipe's feature blocks by out-of-fold log loss, without fooling itself.

Every extracted block (a backbone at one scale, its final or its middle layer: a `blocks.Source`)
is a candidate. `select` adds them greedily: at each step the candidate whose addition gives the
lowest cross-validated log loss (FOLDS folds) of the recipe's own head, trained and scored as the recipe is
(views pooled or not, TTA or not); it stops when no addition lowers the loss by MIN_GAIN.

The folds that choose the blocks also score them, so the chosen blocks' OOF log loss flatters
them. `select` measures by how much with nested cross-validation: for each outer fold, the blocks
are chosen again on the other folds alone (their own folds as the inner ones), and a head on those
blocks scores the held-out fold. The OOF of that whole procedure is honest; its difference from
the chosen blocks' OOF is recorded as `Selection.flattery` and shown beside the recipe's OOF.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from transfer_ensemble import ensemble, heads, progress
from transfer_ensemble.config import TrainConfig

log = logging.getLogger(__name__)

MIN_GAIN = 0.005
"""A block is added only if it lowers the cross-validated log loss by this share (0.5%): less is
within the noise of 5 folds on a thousand images, and every block costs prediction time."""
FOLDS = 3
"""Folds of the selection's cross-validation, and of its nested check's outer loop (the inner one
has 2): each candidate set costs FOLDS fits, so the selection costs a few times one recipe's
training, not dozens."""
MAX_IMAGES = 3000
"""The selection (and its nested check) runs on at most this many training images, a stratified
sample fixed by the seed; the recipe itself then trains on all of them."""

Features = Mapping[str, Mapping[str, np.ndarray]]  # source -> view -> training rows


@dataclass(frozen=True)
class Selection:
    """The blocks a recipe chose and how: the candidates, the greedy path (each block added with
    the cross-validated log loss after adding it), the chosen blocks' log loss on the folds that
    chose them, and the honest (nested) log loss of choosing and training together."""

    candidates: tuple[str, ...]
    chosen: tuple[str, ...]
    path: tuple[tuple[str, float], ...]
    chosen_log_loss: float
    nested_log_loss: float
    fold_choices: tuple[tuple[str, ...], ...]
    images: int
    key: str

    @property
    def flattery(self) -> float:
        """How much lower the chosen blocks' OOF log loss is than the honest estimate (>= 0 flatters)."""
        return self.nested_log_loss - self.chosen_log_loss

    def to_json(self) -> dict:
        """As recipe.json holds it (lists, not tuples), so a recipe's inputs compare equal to their
        record and its finished folds are reused."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, obj: dict) -> "Selection":
        return cls(tuple(obj["candidates"]), tuple(obj["chosen"]), tuple((s, float(v)) for s, v in obj["path"]),
                   float(obj["chosen_log_loss"]), float(obj["nested_log_loss"]),
                   tuple(tuple(c) for c in obj["fold_choices"]), int(obj["images"]), str(obj["key"]))

    def describe(self) -> str:
        """One line: what was chosen of what, and how honest its OOF is."""
        left = [c for c in self.candidates if c not in self.chosen]
        return (f"blocks chosen by OOF: {', '.join(self.chosen)}" + (f" (left out: {', '.join(left)})" if left else "")
                + f"; on the selection's {FOLDS} folds their log loss is {self.chosen_log_loss:.4f}, and "
                  f"{self.nested_log_loss:.4f} where each fold's blocks were chosen without it (nested): "
                  f"the choosing flatters it by {self.flattery:+.4f}")


def selection_key(candidates: dict, labels: str, config: TrainConfig) -> str:
    """What a selection depends on: the candidates' feature identities, the labels, the recipe's
    options and this module's settings. A recorded selection with the same key is reused."""
    text = json.dumps({"candidates": candidates, "labels": labels, "config": config.to_json(),
                       "min_gain": MIN_GAIN, "max_images": MAX_IMAGES, "folds": FOLDS}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_rows(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` row indices, stratified by class (each class keeps its share, at least 2
    rows where it has them), fixed by `seed`; every row when there are no more than `limit`."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = max(min(2, len(rows)), int(round(limit * len(rows) / len(labels))))
        keep.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def inner_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified folds of `labels`: `folds` where every class has the rows for them, and at least 2."""
    from transfer_ensemble.crossval import fold_assignment

    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    return fold_assignment(labels, max(2, min(folds, smallest)), seed)


def cv_probabilities(config: TrainConfig, x: Mapping[str, np.ndarray], labels: np.ndarray,
                     assignment: np.ndarray, n_classes: int, views: Sequence[str],
                     folds: Sequence[int] | None = None) -> np.ndarray:
    """Out-of-fold probabilities of `config`'s head on the rows `x` (view -> matrix), trained and
    scored as a recipe is (one model per view or pooled, TTA or not, each fold's seed as
    `crossval.fold_seed`), for the folds `folds` of `assignment` (default: all); rows of other
    folds stay 0."""
    from transfer_ensemble.crossval import fold_seed
    from transfer_ensemble.recipes import model_groups

    entry = heads.get(config.head)
    per_group = []
    for group in model_groups(config, views):
        pred = np.zeros((len(labels), n_classes))
        for k in (np.unique(assignment) if folds is None else folds):
            train, val = np.flatnonzero(assignment != k), np.flatnonzero(assignment == k)
            model = entry.create(config.options, n_classes)
            model.fit([x[v][train] for v in group.train_views], labels[train], [x[v][val] for v in group.train_views],
                      labels[val], fold_seed(config.seed, group.name, int(k)))
            pred[val] = heads.score(model, {v: x[v][val] for v in group.scored_views}, group.scored_views)
        per_group.append(pred)
    return np.mean(per_group, axis=0)


def _columns(features: Features, subset: Sequence[str], rows: np.ndarray, views: Sequence[str]) -> dict:
    return {v: np.concatenate([np.asarray(features[s][v])[rows] for s in subset], axis=1) for v in views}


def greedy(loss_of: Callable[[tuple[str, ...]], float], candidates: Sequence[str],
           min_gain: float = MIN_GAIN) -> tuple[tuple[str, ...], tuple[tuple[str, float], ...]]:
    """Forward selection: add the candidate that lowers `loss_of` most, while it lowers it by at
    least `min_gain` (a share). Returns the chosen candidates (in candidate order) and the path."""
    chosen: list[str] = []
    path: list[tuple[str, float]] = []
    best = float("inf")
    while len(chosen) < len(candidates):
        trials = {c: loss_of(tuple(s for s in candidates if s in chosen or s == c))
                  for c in candidates if c not in chosen}
        pick = min(trials, key=trials.get)
        if chosen and trials[pick] > best * (1 - min_gain):
            break
        chosen.append(pick)
        best = trials[pick]
        path.append((pick, float(trials[pick])))
    return tuple(s for s in candidates if s in chosen), tuple(path)


def select(config: TrainConfig, features: Features, candidates: Sequence[str], views: Sequence[str],
           labels: np.ndarray, n_classes: int, key: str = "") -> Selection:
    """Choose the blocks of `candidates` a recipe of `config` trains on (see the module's
    docstring), on the training rows of `features` (FOLDS stratified folds fixed by the recipe's
    seed; at most MAX_IMAGES of them)."""
    rows = sample_rows(labels, MAX_IMAGES, config.seed)
    y = labels[rows]
    folds = inner_assignment(y, FOLDS, config.seed)
    fold_ids = np.unique(folds)
    memo: dict = {}

    def loss_of(subset: tuple[str, ...], within: np.ndarray, assigned: np.ndarray) -> float:
        """The CV log loss of `subset` on the rows `within` (indices into `rows`) with folds `assigned`."""
        marker = (subset, within.tobytes())
        if marker not in memo:
            x = _columns(features, subset, rows[within], views)
            pred = cv_probabilities(config, x, y[within], assigned, n_classes, views)
            memo[marker] = ensemble.score(y[within], pred)["log_loss"]
            bar.update()
        return memo[marker]

    everything = np.arange(len(rows))
    with progress.bar(desc="choose blocks by OOF", unit="CV") as bar:
        chosen, path = greedy(lambda s: loss_of(s, everything, folds), candidates)
        nested = np.zeros((len(rows), n_classes))
        choices = []
        for k in fold_ids:
            inner = np.flatnonzero(folds != k)
            inner_folds = inner_assignment(y[inner], FOLDS - 1, config.seed)
            mine, _ = greedy(lambda s: loss_of(s, inner, inner_folds), candidates)
            choices.append(mine)
            x = _columns(features, mine, rows, views)
            nested += cv_probabilities(config, x, y, folds, n_classes, views, folds=[k])
    return Selection(tuple(candidates), chosen, path, path[-1][1], ensemble.score(y, nested)["log_loss"],
                     tuple(choices), len(rows), key)

"""Head recipes of a run: what each is (`Recipe`, `Blend`), their names and records, whether
each is current for the run's features and labels (`recipe_statuses`), and which one a command
uses (`select_recipe`).

A recipe lives in RUN/heads/<recipe>/ (the layout is in `runfolder`): ``recipe.json`` (kind,
options, folds, seed, and the identity of the features and labels it was trained on), a folder
per view (or the pooled group) and fold (`FoldFiles`), ``oof_<view>.npy`` and ``metrics.json``,
written last. A blend lives in RUN/heads/blend-<a>+<b>/. The functions take the `RunFolder`,
whose per-lock cache (dataset.json, the features' identities) they share with the rest of a step.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from transfer_ensemble import heads, plugins
from transfer_ensemble.blocks import Blocks, blocks_for, from_record, views_record
from transfer_ensemble.config import TrainConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.records import DamagedFile, damaged, labels_digest, load_json, load_npy
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.storage import write_json

log = logging.getLogger(__name__)

POOLED = "pooled"  # the model group of a recipe with pooled views: one model per fold on every view
RECIPE_RECORD = "recipe.json"
BEST = "best"  # --heads best: the current recipe with the lowest OOF log loss
BLEND_RECORD = "blend.json"
BLEND_PREFIX = "blend-"


@dataclass(frozen=True)
class FoldFiles:
    """One fold model of a recipe: the head (its own format), its predictions and history.

    ``done.json`` is written last, with the identity of the test features ``test_pred.npy`` was
    computed from: a fold without it is unfinished.
    """

    folder: Path

    def model(self, suffix: str) -> Path:
        return self.folder / f"model{suffix}"

    @property
    def val_index(self) -> Path:
        return self.folder / "val_index.npy"

    @property
    def val_pred(self) -> Path:
        return self.folder / "val_pred.npy"

    @property
    def test_pred(self) -> Path:
        return self.folder / "test_pred.npy"

    @property
    def history(self) -> Path:
        return self.folder / "history.json"

    @property
    def done(self) -> Path:
        return self.folder / "done.json"


@dataclass(frozen=True)
class ModelGroup:
    """The fold models of a recipe trained on the same views: `name` (a view, or POOLED), the
    views whose rows they train on, and the views they score (their probabilities averaged)."""

    name: str
    train_views: tuple[str, ...]
    scored_views: tuple[str, ...]


def model_groups(config: TrainConfig, views: Sequence[str]) -> tuple[ModelGroup, ...]:
    """The model groups of a recipe of `config` on `views`: one per view, or the one pooled group
    (`pool_views`). Each scores every view with TTA, else its own (pooled models: the original)."""
    views = tuple(views)
    groups = [(POOLED, views)] if config.pool_views else [(view, (view,)) for view in views]
    return tuple(ModelGroup(name, train, views if config.tta else train[:1]) for name, train in groups)


@dataclass
class Recipe:
    """The fold heads trained with one kind of head and one set of options on one set of feature
    blocks: K per view (the paper's 2 x K), or K models each trained on every view (`pool_views`).
    Its blocks (`blocks`) are the ones its `inputs` record: what it trains on and scores, whatever
    the run extracted since."""

    name: str
    config: TrainConfig
    inputs: dict
    folder: Path

    def fold(self, view: str, fold: int) -> FoldFiles:
        return FoldFiles(self.folder / view / f"fold{fold}")

    def oof(self, view: str) -> Path:
        return self.folder / f"oof_{view}.npy"

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def record_path(self) -> Path:
        return self.folder / RECIPE_RECORD

    @property
    def blocks(self) -> Blocks:
        """The feature blocks the recipe is trained on and scores (`blocks.from_record`)."""
        return from_record(self.inputs)

    @property
    def views(self) -> tuple[str, ...]:
        """The views the recipe is trained on and scores, in registry order."""
        return self.blocks.views

    @property
    def groups(self) -> tuple[str, ...]:
        """The model groups' names (`model_groups`)."""
        return tuple(group.name for group in model_groups(self.config, self.views))

    def train_views(self, group: str) -> tuple[str, ...]:
        """The views whose rows a group's models are trained on."""
        return next(g.train_views for g in model_groups(self.config, self.views) if g.name == group)

    def scored_views(self, group: str) -> tuple[str, ...]:
        """The views a group's models score, averaged."""
        return next(g.scored_views for g in model_groups(self.config, self.views) if g.name == group)

    def predicted_views(self, tta: bool = True) -> tuple[str, ...]:
        """The views whose features scoring new images needs (`predict`): every view the submission
        scores with `tta` (a view's own models score it even without the recipe's TTA), else the
        original only."""
        return self.blocks.scored_views(tta)

    @property
    def jobs(self) -> list[tuple[str, int]]:
        return [(group, fold) for group in self.groups for fold in range(self.config.folds)]

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted on the OOF predictions (1.0 when not calibrated)."""
        return temperature_of(self.metrics())

    def metrics(self) -> dict | None:
        """The recipe's scores, or None while it is unfinished or its metrics are damaged."""
        return read_metrics(self.metrics_path)


def read_metrics(path: Path) -> dict | None:
    """A recipe's or blend's metrics.json, or None while it is unfinished or damaged."""
    try:
        return load_json(path)
    except DamagedFile:
        return None


def temperature_of(metrics: dict | None) -> float:
    """The temperature recorded in a recipe's or blend's metrics (1.0 when not calibrated)."""
    return float(((metrics or {}).get("calibration") or {}).get("temperature", 1.0))


def recipe_name(config: TrainConfig, blocks: Blocks | None = None) -> str:
    """A readable name that differs exactly when the options or the views do: the head, then each
    non-default option, then the views beyond the pair (`Blocks.label`)."""
    defaults = TrainConfig(head=config.head).to_json()
    implied = ("multiscale", "select_blocks") if config.blocks else ()  # named blocks settle both
    changed = {k: v for k, v in config.to_json().items() if k != "head" and k not in implied and v != defaults.get(k)}
    label = blocks.label if blocks is not None else ""
    return "-".join([config.head] + [_name_part(k, v) for k, v in changed.items()] + ([label] if label else []))


def _name_part(key: str, value: object) -> str:
    if isinstance(value, bool):
        return key if value else f"no_{key}"
    if isinstance(value, list):
        return f"{key}_{'+'.join(map(str, value))}"
    return f"{key}{value}"


@dataclass
class Blend:
    """Head recipes of one run mixed with weights fitted on their OOF predictions, then calibrated
    with a temperature fitted on the mixed OOF predictions."""

    name: str
    parts: list[str]
    weights: list[float]
    part_inputs: dict  # the inputs each part was trained on, when the blend was fitted
    folder: Path

    @property
    def record_path(self) -> Path:
        return self.folder / BLEND_RECORD

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"

    def metrics(self) -> dict | None:
        return read_metrics(self.metrics_path)

    @property
    def temperature(self) -> float:
        return temperature_of(self.metrics())


def blend_name(parts: Sequence[str]) -> str:
    return BLEND_PREFIX + "+".join(parts)


MAX_FOLDER_BYTES = 200
"""The longest recipe or blend folder name: file systems allow 255 bytes, less room for the
temporary and staging names written beside and inside it."""


UNSAFE = re.compile(r"[/\\\x00-\x1f]")
"""What a recipe or blend folder name may not hold as it is: a head's option values (a plug-in
head's text option, say) can hold anything, and a folder name must not climb out of RUN/heads/."""


def folder_name(name: str) -> str:
    """The folder of a recipe or blend called `name`: the name itself while it is plain (no path
    separator or control character, no leading dot) and fits in MAX_FOLDER_BYTES, else its
    readable start (those characters as "_") and a digest of the whole (the record keeps the name)."""
    raw = name.encode()
    if len(raw) <= MAX_FOLDER_BYTES and not UNSAFE.search(name) and not name.startswith("."):
        return name
    start = UNSAFE.sub("_", name).lstrip(".").encode()[:MAX_FOLDER_BYTES - 17].decode("utf-8", "ignore")
    return f"{start}-{hashlib.sha256(raw).hexdigest()[:16]}"


def _recorded_name(record: dict, path: Path) -> str:
    """A recipe's or blend's name: as its record at `path` has it where the folder's name is
    that name shortened (`folder_name`), else the folder's own name."""
    name = record.get("name")
    return name if isinstance(name, str) and folder_name(name) == path.parent.name else path.parent.name


@dataclass
class Unregistered:
    """A recipe of a kind of head that is not registered in this process (a plug-in not imported)."""

    name: str
    head: str
    module: str | None  # the module that registered the head, as the recipe records it
    folder: Path

    def why(self, run: RunFolder, note: str = "") -> str:
        """Why it cannot be used, and how to register its head (`note` follows the recipe's name)."""
        return plugins.missing_message("head", self.head, self.module,
                                       f"The head recipe {self.name!r} of {run.path}{note}")


@dataclass
class RecipeStatus:
    """A recipe as `train`'s summary and the report list it."""

    recipe: "Recipe | Blend | Unregistered"
    state: str  # "current", "stale" (trained on other features or labels), "unfinished" or "unregistered"
    metrics: dict | None

    @property
    def oof_log_loss(self) -> float:
        return self.metrics["oof"]["ensemble"]["log_loss"] if self.metrics else float("inf")


def recipe_for(run: RunFolder, config: TrainConfig, blocks: Blocks | None = None,
               inputs: dict | None = None) -> Recipe:
    """The recipe of `config` on `blocks` (default: those it sees in the run's extraction) in `run`
    (named by `recipe_name`), with `inputs` (none given: the record of `blocks` alone)."""
    blocks = blocks_for(run.extract_config(), config) if blocks is None else blocks
    name = recipe_name(config, blocks)
    return Recipe(name, config, inputs or views_record(blocks) | {"features": dict.fromkeys(blocks.sources)},
                  run.heads_dir / folder_name(name))


def list_recipes(run: RunFolder) -> list[Recipe]:
    """Every usable recipe trained on this run, in name order (unreadable records are skipped, with
    a warning; recipes of heads not registered here are `unregistered_recipes`)."""
    return [r for r in _read_recipes(run) if isinstance(r, Recipe)]


def unregistered_recipes(run: RunFolder) -> list[Unregistered]:
    """The recipes of this run whose kind of head is not registered in this process."""
    return [r for r in _read_recipes(run) if isinstance(r, Unregistered)]


def _read_recipes(run: RunFolder) -> "list[Recipe | Unregistered]":
    found: "list[Recipe | Unregistered]" = []
    if not run.heads_dir.is_dir():
        return found
    for folder in sorted(p for p in run.heads_dir.iterdir() if p.is_dir()):
        if folder.name.startswith(BLEND_PREFIX):
            continue
        record = folder / RECIPE_RECORD
        if folder.name in ("original", "flipped") and not record.exists():
            log.warning("%s holds fold models in the layout of transfer-ensemble before head recipes; "
                        "they are not used: `train` trains them again as a recipe", folder)
            continue
        try:
            obj = load_json(record)
            head = obj["config"].get("head") if isinstance(obj.get("config"), dict) else None
            if isinstance(head, str) and head not in heads.HEADS:
                module = (obj.get("plugins") or {}).get("head", {}).get(head)
                found.append(Unregistered(_recorded_name(obj, record), head, module, folder))
                continue
            config = TrainConfig.from_json(obj["config"], source=str(record))
            found.append(Recipe(_recorded_name(obj, record), config, obj["inputs"], folder))
        except (DamagedFile, KeyError, TypeError, AttributeError, UserError) as exc:
            log.warning("%s: the head recipe in %s is unreadable and is ignored (train it again "
                        "to replace it)", exc, folder)
    return found


def blend_folder(run: RunFolder, parts: Sequence[str]) -> Path:
    """Where the blend of the recipes `parts` lives."""
    return run.heads_dir / folder_name(blend_name(parts))


def list_blends(run: RunFolder) -> list[Blend]:
    """Every blend fitted on this run (unreadable records are skipped, with a warning)."""
    found = []
    if not run.heads_dir.is_dir():
        return found
    for folder in sorted(run.heads_dir.glob(BLEND_PREFIX + "*")):
        try:
            obj = load_json(folder / BLEND_RECORD)
            found.append(Blend(_recorded_name(obj, folder / BLEND_RECORD), list(obj["parts"]),
                               [float(w) for w in obj["weights"]], dict(obj["part_inputs"]), folder))
        except (DamagedFile, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: the blend in %s is unreadable and is ignored (fit it again to replace it)",
                        exc, folder)
    return found


def write_blend(blend: Blend) -> None:
    write_json(blend.record_path, {"name": blend.name, "parts": blend.parts, "weights": blend.weights,
                                   "part_inputs": blend.part_inputs})


def write_recipe(recipe: Recipe) -> None:
    """recipe.json: the name, the options, the inputs (`Recipe.blocks` and their identities) and the
    plug-in its head is, if it is one (the module that registered it)."""
    used = plugins.used("head", [recipe.config.head])
    write_json(recipe.record_path, {"name": recipe.name, "config": recipe.config.to_json(), "inputs": recipe.inputs,
                                    **({"plugins": {"head": used}} if used else {})})


def recipe_statuses(run: RunFolder) -> list[RecipeStatus]:
    """Every recipe with its state and scores: current ones best first, then the others.

    A recipe is current while the blocks it records are extracted, complete, from the same
    settings, images and labels as when it was trained: extracting other blocks (views, scales,
    layers) changes none. Raises UserError naming the file when the run's records or features
    are damaged.
    """
    labels = labels_digest(run.read_run_data().labels)
    out = []
    for recipe in _read_recipes(run):
        if isinstance(recipe, Unregistered):
            out.append(RecipeStatus(recipe, "unregistered", read_metrics(recipe.folder / "metrics.json")))
            continue
        blocks = recipe.blocks
        current = run.feature_inputs(blocks) if blocks.sources and run.holds(blocks) else {}
        metrics = recipe.metrics()
        fresh = bool(current) and recipe.inputs.get("features") == current["features"] \
            and recipe.inputs.get("train") == current["train"] and recipe.inputs.get("labels") == labels
        state = "stale" if not fresh else "current" if metrics is not None else "unfinished"
        out.append(RecipeStatus(recipe, state, metrics))
    states = {s.recipe.name: s for s in out}
    for blend in list_blends(run):
        fresh = all(p in states and states[p].state == "current"
                    and states[p].recipe.inputs == blend.part_inputs.get(p) for p in blend.parts)
        metrics = blend.metrics()
        state = "stale" if not fresh else "current" if metrics is not None else "unfinished"
        out.append(RecipeStatus(blend, state, metrics))
    out.sort(key=lambda s: (s.state != "current", s.oof_log_loss, s.recipe.name))
    return out


def select_recipe(run: RunFolder, name: str | None = None, command: str = "submit",
                  blends: bool = True) -> "Recipe | Blend":
    """The recipe `name`; with None, the one the last `train` trained; with BEST, the current
    one with the lowest OOF log loss (of the recipes alone, not `blends`, for a command that
    cannot score blends). UserError if there is none or it cannot be used."""
    statuses = recipe_statuses(run)
    train = f"`transfer-ensemble train --run {run.path}`"
    last = name is None
    if name is None:
        name = run.read_config_optional().get("heads")
        if name is not None and not any(s.recipe.name == name for s in statuses):
            name = None  # its folder was removed: fall back to the best
    if name == BEST:
        name = None
    if name is not None:
        match = [s for s in statuses if s.recipe.name == name]
        if not match:
            known = ", ".join(s.recipe.name for s in statuses) or "none yet"
            raise UserError(f"--heads {name!r}: the run {run.path} has no such head recipe (it has: "
                            f"{known}). Pass one of those names, or leave --heads out for the best.")
        status = match[0]
        if isinstance(status.recipe, Unregistered):
            others = ", ".join(s.recipe.name for s in statuses if s.state == "current") or "none"
            which = " (the one the last `train` trained)" if last else ""
            raise UserError(f"{status.recipe.why(run, which)} Nothing was written; to {command} with another "
                            f"recipe instead, pass --heads NAME (current ones: {others}).")
        if isinstance(status.recipe, Blend) and status.state != "current":
            missing = [s.recipe for s in statuses if isinstance(s.recipe, Unregistered)
                       and s.recipe.name in status.recipe.parts]
            if missing:
                raise UserError(f"The blend {name!r} of {run.path} mixes {missing[0].name!r}: "
                                f"{missing[0].why(run)}")
            parts = ",".join(status.recipe.parts)
            raise UserError(f"The blend {name!r} of {run.path} mixes recipes that were trained again or "
                            f"are no longer current. Train them ({train[:-1]} --heads NAME`), then fit "
                            f"the blend again ({train[:-1]} --blend {parts}`).")
        if status.state == "stale":
            raise UserError(f"The head recipe {name!r} of {run.path} was trained on other features "
                            f"or labels than the run has now (it was extracted again since), so "
                            f"its predictions would be stale. Run {train[:-1]} --heads {name}` "
                            f"to retrain it on the current features, then {command} again.")
        if status.state == "unfinished":
            raise UserError(f"The head recipe {name!r} of {run.path} is unfinished. Run "
                            f"{train[:-1]} --heads {name}` to finish it.")
        return status.recipe
    current = [s for s in statuses if s.state == "current" and (blends or not isinstance(s.recipe, Blend))]
    if not current:
        stale = [s.recipe.name for s in statuses if s.state == "stale"]
        unfinished = [s.recipe.name for s in statuses if s.state == "unfinished"]
        why = (f" Its head recipes {', '.join(stale)} were trained on features or labels that "
               f"have changed since (the run was extracted again), so they would be stale."
               if stale else "")
        if unfinished:
            why += (f" Its head recipes {', '.join(unfinished)} are unfinished (or their "
                    f"metrics.json is damaged): `train --heads NAME` finishes one.")
        missing = [s.recipe for s in statuses if isinstance(s.recipe, Unregistered)]
        if missing:
            why += " " + missing[0].why(run)
        raise UserError(f"{run.path} has no trained heads for its current features.{why} "
                        f"Run {train} first.")
    return current[0].recipe


def fold_test_predictions(run: RunFolder, recipe: Recipe, n_test: int,
                          test_identity: str) -> dict[str, list[np.ndarray]]:
    """Each fold model's test predictions per view, checked to be complete and current."""
    fix = f"Run `transfer-ensemble train --run {run.path} --heads {recipe.name}` again"
    out: dict[str, list[np.ndarray]] = {group: [] for group in recipe.groups}
    for view, fold in recipe.jobs:
        files = recipe.fold(view, fold)
        try:
            done = load_json(files.done)
            if done.get("test_features") != test_identity:
                raise UserError(f"The test features of {run.path} changed after the head recipe "
                                f"{recipe.name!r} predicted them (the test images or the extraction "
                                f"changed). {fix}: it reuses the fold models and predicts the new "
                                f"test set.")
            out[view].append(load_npy(files.test_pred, (n_test, None)))
        except DamagedFile as exc:
            raise damaged(exc, f"{fix}: it retrains or re-predicts that fold") from None
    return out

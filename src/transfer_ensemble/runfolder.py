"""The run folder: where every result is stored, what it was computed from, and whether it is done.

This is the one module that knows the layout below. Steps ask it for paths and records; no other
module joins path pieces of a run folder. A run folder is this tool's database, passed from step
to step like a training checkpoint::

    RUN/config.json                 options of the features the run has (written when `extract`
                                    succeeds), the last `train` options, classes, and the
                                    versions and Keras backend of the step that wrote it last
    RUN/dataset.json                images, ids and labels of each split, bad test ids
    RUN/image_check.json            verdict of every image seen, by the SHA-256 of its bytes
    RUN/bad_images.json             images left out by --on-bad-image skip, with reasons
    RUN/features/<split>/<source>/  a feature store (see `store.StoreFiles`) of one backbone at one
                                    scale: <backbone>, or <backbone>@<scale>x beyond the first
    RUN/heads/<recipe>/recipe.json  a head recipe: kind, options, folds, seed, and the identity
                                    of the features and labels it was trained on
    RUN/heads/<recipe>/<view>/fold<k>/  one fold model and its predictions (see `FoldFiles`)
    RUN/heads/<recipe>/oof_<view>.npy   out-of-fold predictions of each view
    RUN/heads/<recipe>/metrics.json     OOF (and hold-out) scores, the temperature; written last
    RUN/heads/blend-<a>+<b>/blend.json  a blend: its recipes, weights fitted on their OOF
                                    predictions, and what each was trained on; metrics.json
                                    (a recipe or blend name over 200 bytes: its folder is the
                                    name's start and a digest, see `folder_name`)
    RUN/report.html, RUN/report/    the run report
    RUN/predict/<key>/              feature stores of images `predict` scored

Every file is written to a temporary name and renamed when complete (`storage`); a step holds
the folder's lock (`RunFolder.lock`), which also removes what a killed step left. Each result
records the identity of its inputs, so one computed from features or labels that have changed
since is never used: `train` recomputes it, `submit`, `predict` and `report` refuse it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from transfer_ensemble import __version__, backend, views
from transfer_ensemble.config import ExtractConfig, TrainConfig, merged
from transfer_ensemble.dataset import Dataset, Item
from transfer_ensemble.errors import UserError
from transfer_ensemble.records import DamagedFile, damaged, digest, labels_digest, load_json, load_npy
from transfer_ensemble.storage import run_lock, write_json
from transfer_ensemble.store import StoreFiles, feature_settings, source_key

log = logging.getLogger(__name__)

POOLED = "pooled"  # the model group of a recipe with pooled views: one model per fold on every view
SPLITS = ("train", "test")
PREDICT_SPLIT = "predict"
RECIPE_RECORD = "recipe.json"
BEST = "best"  # --heads best: the current recipe with the lowest OOF log loss
BLEND_RECORD = "blend.json"
BLEND_PREFIX = "blend-"


def package_versions() -> dict:
    versions = {"python": platform.python_version(), "transfer_ensemble": __version__}
    for name in ("tensorflow", "jax", "jaxlib", "torch", "keras", "numpy", "opencv-python-headless",
                 "scikit-learn", "pandas"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def remove_temporaries(files: Sequence[Path], folders: Sequence[Path]) -> list[Path]:
    """Delete `files` and the temporary files and staging folders (``*.new``) under `folders`."""
    found = list(files)
    for folder in folders:
        if folder.is_dir():
            found += [p for p in folder.rglob(".*.tmp*") if p.is_file()]
            found += [p for p in folder.rglob("*.new") if p.is_dir()]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if found:
        log.info("removed %d temporary files left by an interrupted step", len(found))
    return found


@dataclass(frozen=True)
class PredictCache:
    """Features of one list of images that `predict` scored: a store per backbone, and the list."""

    folder: Path

    def store(self, backbone: str) -> StoreFiles:
        return StoreFiles(self.folder / "features" / backbone)

    @property
    def images(self) -> Path:
        return self.folder / "images.json"

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what a killed `predict` left. Only while holding the cache's lock."""
        return remove_temporaries([], [self.folder])


@dataclass
class RunData:
    """What `extract` recorded about the data: the data set, and test images left out as bad."""

    dataset: Dataset
    bad_test_ids: list[str]

    @property
    def good_test(self) -> list[Item]:
        bad = set(self.bad_test_ids)
        return [it for it in self.dataset.test if it.id not in bad]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.dataset.train], dtype=np.int64)

    def to_json(self) -> dict:
        return {**self.dataset.to_json(), "bad_test_ids": self.bad_test_ids}


@dataclass
class Recipe:
    """The fold heads trained with one kind of head and one set of options: K per view (the
    paper's 2 x K), or K models each trained on every view (`pool_views`). Its views are the
    ones recorded in `inputs` (the paper's pair where none are)."""

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
    def views(self) -> tuple[str, ...]:
        """The views the recipe is trained on and scores, in registry order."""
        return tuple(self.inputs.get("views", views.PAIR))

    @property
    def groups(self) -> tuple[str, ...]:
        """The model groups: one per view, or the one pooled group."""
        return (POOLED,) if self.config.pool_views else self.views

    def train_views(self, group: str) -> tuple[str, ...]:
        """The views whose rows a group's models are trained on."""
        return self.views if group == POOLED else (group,)

    def scored_views(self, group: str) -> tuple[str, ...]:
        """The views a group's models score, averaged: every view with TTA, else their own
        (for pooled models, the original)."""
        return self.views if self.config.tta else self.train_views(group)[:1]

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


def recipe_name(config: TrainConfig) -> str:
    """A readable name that differs exactly when the options do: the head, then each non-default option."""
    defaults = TrainConfig(head=config.head).to_json()
    changed = {k: v for k, v in config.to_json().items() if k != "head" and v != defaults[k]}
    return "-".join([config.head] + [(k if v else f"no_{k}") if isinstance(v, bool) else f"{k}{v}"
                                     for k, v in changed.items()])


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


def folder_name(name: str) -> str:
    """The folder of a recipe or blend called `name`: the name itself while it fits in
    MAX_FOLDER_BYTES, else its readable start and a digest of the whole (the record keeps the name)."""
    raw = name.encode()
    if len(raw) <= MAX_FOLDER_BYTES:
        return name
    start = raw[:MAX_FOLDER_BYTES - 17].decode("utf-8", "ignore")
    return f"{start}-{hashlib.sha256(raw).hexdigest()[:16]}"


def _recorded_name(record: dict, path: Path) -> str:
    """A recipe's or blend's name: as its record at `path` has it where the folder's name is
    that name shortened (`folder_name`), else the folder's own name."""
    name = record.get("name")
    return name if isinstance(name, str) and folder_name(name) == path.parent.name else path.parent.name


@dataclass
class RecipeStatus:
    """A recipe as `train`'s summary and the report list it."""

    recipe: "Recipe | Blend"
    state: str  # "current", "stale" (trained on other features or labels) or "unfinished"
    metrics: dict | None

    @property
    def oof_log_loss(self) -> float:
        return self.metrics["oof"]["ensemble"]["log_loss"] if self.metrics else float("inf")


class RunFolder:
    """One run folder: its paths, its lock, and its records, read with their defaults."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # While a step holds the lock: dataset.json and the features' identities, read once for the
        # whole step (no other process changes them meanwhile; extract's write_run_data resets it).
        self._held: dict | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def existing(cls, path: str | Path, command: str) -> "RunFolder":
        """A run folder that must already exist (reading commands must not create one)."""
        run = cls(path)
        if not run.path.is_dir():
            raise UserError(f"The run folder {run.path} does not exist, so there is nothing to {command}. "
                            f"Check --run, or run `transfer-ensemble extract --data DIR --run {run.path}` "
                            f"first.")
        if not (run.config_path.exists() or run.dataset_path.exists()):
            raise UserError(f"{run.path} is not a run folder: it has neither config.json nor dataset.json, "
                            f"which `extract` writes when it finishes, so there is nothing to {command} (and "
                            f"nothing was written there). Pass --run with the folder that `transfer-ensemble "
                            f"extract --data DIR --run RUN` wrote (a data folder goes to --data).")
        return run

    # Paths.
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def dataset_path(self) -> Path:
        return self.path / "dataset.json"

    @property
    def image_check_path(self) -> Path:
        return self.path / "image_check.json"

    @property
    def bad_images_path(self) -> Path:
        return self.path / "bad_images.json"

    @property
    def heads_dir(self) -> Path:
        return self.path / "heads"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def predict_dir(self) -> Path:
        return self.path / "predict"

    def predict_caches(self, root: Path | None = None) -> list[PredictCache]:
        """Every predict cache under `root` (default RUN/predict/)."""
        root = self.predict_dir if root is None else Path(root)
        return [PredictCache(p) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []

    def predict_cache(self, keys: Sequence[str], root: Path | None = None) -> PredictCache:
        """Where the features of this list of images (by content) are kept under `root`."""
        root = self.predict_dir if root is None else Path(root)
        return PredictCache(root / digest(list(keys))[:16])

    def store(self, split: str, backbone: str) -> StoreFiles:
        return StoreFiles(self.path / "features" / split / backbone)

    def stores(self, split: str, sources: Sequence[str]) -> list[StoreFiles]:
        return [self.store(split, name) for name in sources]

    def feature_sources(self, config: TrainConfig) -> list[str]:
        """The stores a recipe's features are made of, side by side: every backbone at the first
        scale, then (`multiscale`) at each further scale the run extracted."""
        extract = self.extract_config()
        scales = extract.scales if config.multiscale else extract.scales[:1]
        return [source_key(name, scale) for scale in scales for name in extract.backbones]

    def recipe_views(self, config: TrainConfig) -> tuple[str, ...]:
        """The views a recipe of `config` uses: the run's (``--views``), or the pair for heads that
        keep to the paper's views (``views.PAIR_HEADS``)."""
        return views.PAIR if config.head in views.PAIR_HEADS else self.extract_config().views

    def views_input(self, config: TrainConfig) -> dict:
        """The views entry of a recipe's inputs: none for the pair, so recipes from before views
        were recorded keep their identity."""
        chosen = self.recipe_views(config)
        return {} if chosen == views.PAIR else {"views": list(chosen)}

    def recipe(self, config: TrainConfig, inputs: dict | None = None) -> Recipe:
        name = recipe_name(config)
        return Recipe(name, config, inputs or {}, self.heads_dir / folder_name(name))

    # The lock, and what a killed step left.
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the run folder's lock (creating the folder) and remove stale temporary files.

        A folder this call created is removed again when the step is refused (UserError) before
        it computed any features: bad input leaves no empty run folder behind.
        """
        created = _first_missing(self.path)
        try:
            with run_lock(self.path):
                self._held = {}
                try:
                    self.remove_stale_temporaries()
                    yield self
                finally:
                    self._held = None
        except UserError:
            if created is not None and not (self.path / "features").exists():
                shutil.rmtree(created, ignore_errors=True)
            raise

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files a killed step left. Only while holding the lock.

        Only the run's own files and folders are looked at (a user's files beside them are
        not); predict caches are left alone: each has a lock of its own.
        """
        own = (self.config_path, self.dataset_path, self.image_check_path, self.bad_images_path, self.report_html)
        found = [p for path in own for p in self.path.glob(f".{path.name}.*.tmp*") if p.is_file()]
        return remove_temporaries(found, [self.path / "features", self.heads_dir, self.report_dir])

    # config.json
    def read_config(self) -> dict:
        """config.json; a clear error when it is missing or damaged (extract rewrites it)."""
        if not self.config_path.exists():
            raise UserError(f"{self.path} is not a run folder (it has no config.json). Run "
                            f"`transfer-ensemble extract --data DIR --run {self.path}` first.")
        try:
            config = load_json(self.config_path)
        except DamagedFile as exc:
            raise self._damaged(exc, "Run `transfer-ensemble extract --data DIR --run "
                                     f"{self.path}` again: it rewrites it and reuses the features") from None
        if "extract" not in config:
            raise UserError(f"{self.config_path} records no finished extraction. Run `transfer-ensemble "
                            f"extract --data DIR --run {self.path}` first.")
        return config

    def read_config_optional(self) -> dict:
        """config.json, or {} when it is missing or damaged (for steps that rewrite it)."""
        try:
            return load_json(self.config_path)
        except DamagedFile as exc:
            if self.config_path.exists():
                log.warning("%s: it will be rewritten when this step succeeds", exc)
            return {}

    def update_config(self, **sections: Any) -> dict:
        """Record `sections` in config.json. Call only once the step they describe has succeeded."""
        config = self.read_config_optional()
        config.update(sections)
        config["versions"] = package_versions()
        config["backend"] = backend.name()
        write_json(self.config_path, config)
        return config

    def extract_config(self) -> ExtractConfig:
        """The options the run's features were extracted with (runs from before --scales have one)."""
        saved = self.read_config()["extract"]
        if isinstance(saved, dict) and "scales" not in saved:
            saved = {**saved, "scales": [1.0]}
        return ExtractConfig.from_json(saved, source=str(self.config_path))

    def train_config(self, overrides: dict | None = None) -> TrainConfig:
        """`train`'s options: `overrides` (None = not given) over the last ones recorded. The head is
        the one given, else the default; of the recorded options, the folds and the seed carry
        over, and the head's own options when it is the same head."""
        saved = self.read_config().get("train") or {}
        return merged(TrainConfig, saved, overrides or {}, source=str(self.config_path), head_from_saved=False)

    # dataset.json and the image check
    def read_run_data(self) -> RunData:
        """dataset.json (read once while the lock is held: callers share it and must not change it)."""
        if self._held is not None and "run_data" in self._held:
            return self._held["run_data"]
        run_data = self._read_run_data()
        if self._held is not None:
            self._held["run_data"] = run_data
        return run_data

    def _read_run_data(self) -> RunData:
        try:
            obj = load_json(self.dataset_path)
            return RunData(Dataset.from_json(obj), list(obj.get("bad_test_ids", [])))
        except DamagedFile as exc:
            raise self._damaged(exc, f"Run `transfer-ensemble extract --data DIR --run {self.path}` "
                                     f"again: it rewrites it and reuses the features") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise self._damaged(DamagedFile(self.dataset_path, f"lacks a field ({exc})"),
                                f"Run `transfer-ensemble extract --data DIR --run {self.path}` "
                                f"again: it rewrites it and reuses the features") from None

    def write_run_data(self, run_data: RunData) -> None:
        write_json(self.dataset_path, run_data.to_json())
        if self._held is not None:
            self._held.clear()  # extract recorded new features

    def read_image_check(self) -> dict[str, str | None]:
        """Verdicts of images checked before, by content hash; {} when missing or damaged."""
        try:
            return load_json(self.image_check_path)
        except DamagedFile as exc:
            if self.image_check_path.exists():
                log.warning("%s: checking every image again", exc)
            return {}

    def write_image_check(self, verdicts: dict[str, str | None]) -> None:
        write_json(self.image_check_path, verdicts)

    def write_bad_images(self, bad: dict[str, list[dict]]) -> None:
        write_json(self.bad_images_path, bad)

    # What results were computed from.
    def feature_inputs(self, backbones: Sequence[str]) -> dict:
        """The identity of the run's current features: settings per source (see `feature_sources`),
        and each split's rows.

        Raises UserError naming the file when a store is damaged. Computed once per set of sources
        while the lock is held (hashing every store's keys.json is the slow part of `statuses`).
        """
        held = self._held.setdefault("feature_inputs", {}) if self._held is not None else {}
        if tuple(backbones) not in held:
            held[tuple(backbones)] = self._feature_inputs(backbones)
        return copy.deepcopy(held[tuple(backbones)])

    def _feature_inputs(self, backbones: Sequence[str]) -> dict:
        try:
            self._check_extraction_finished(backbones)
            return {
                "features": {name: feature_settings(load_json(self.store("train", name).meta))
                             for name in backbones},
                **{split: digest([store.identity() for store in self.stores(split, backbones)])
                   for split in SPLITS},
            }
        except DamagedFile as exc:
            raise self._damaged(exc, f"Run `transfer-ensemble extract --data DIR --run {self.path}` "
                                     f"again: it recomputes what is damaged") from None

    def store_settings(self, sources: Sequence[str]) -> dict:
        """What each source's features depend on (its train store's), for config.json once
        `extract` has finished: `feature_inputs` then refuses stores that differ from it. A store
        that cannot be read is left out (`feature_inputs` names it when it is used)."""
        settings = {}
        for name in sources:
            with contextlib.suppress(DamagedFile):
                settings[name] = feature_settings(load_json(self.store("train", name).meta))
        return settings

    def _check_extraction_finished(self, sources: Sequence[str]) -> None:
        """UserError when a store of `sources` holds features of other settings than the extraction
        config.json records: an `extract` with other options was stopped after rewriting it."""
        recorded = self.read_config_optional().get("features")
        if not isinstance(recorded, dict):
            return  # a run from before the stores' settings were recorded
        for split in SPLITS:
            for name in sources:
                then, store = recorded.get(name), self.store(split, name)
                now = feature_settings(load_json(store.meta))
                if then is None or now == then:
                    continue
                differ = ", ".join(f"{k} {then.get(k)!r} recorded, {now.get(k)!r} in the store"
                                   for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k))
                raise UserError(
                    f"The features in {store.folder} are not the ones {self.config_path} records ({differ}): "
                    f"an `extract` with other options was stopped before it finished, so the run's "
                    f"features no longer match its record, and nothing is trained or submitted from "
                    f"them. Finish the extract: run that `transfer-ensemble extract --data DIR --run "
                    f"{self.path} ...` again with the same options (it resumes where it stopped), or with "
                    f"the options config.json records to go back to them.")

    # Head recipes.
    def recipes(self) -> list[Recipe]:
        """Every recipe trained on this run, in name order (unreadable records are skipped, with a warning)."""
        found = []
        if not self.heads_dir.is_dir():
            return found
        for folder in sorted(p for p in self.heads_dir.iterdir() if p.is_dir()):
            if folder.name.startswith(BLEND_PREFIX):
                continue
            record = folder / RECIPE_RECORD
            if folder.name in views.PAIR and not record.exists():
                log.warning("%s holds fold models in the layout of transfer-ensemble before head recipes; "
                            "they are not used: `train` trains them again as a recipe", folder)
                continue
            try:
                obj = load_json(record)
                config = TrainConfig.from_json(obj["config"], source=str(record))
                found.append(Recipe(_recorded_name(obj, record), config, obj["inputs"], folder))
            except (DamagedFile, KeyError, TypeError, UserError) as exc:
                log.warning("%s: the head recipe in %s is unreadable and is ignored (train it again "
                            "to replace it)", exc, folder)
        return found

    def blend(self, parts: Sequence[str]) -> Path:
        return self.heads_dir / folder_name(blend_name(parts))

    def blends(self) -> list[Blend]:
        """Every blend fitted on this run (unreadable records are skipped, with a warning)."""
        found = []
        if not self.heads_dir.is_dir():
            return found
        for folder in sorted(self.heads_dir.glob(BLEND_PREFIX + "*")):
            try:
                obj = load_json(folder / BLEND_RECORD)
                found.append(Blend(_recorded_name(obj, folder / BLEND_RECORD), list(obj["parts"]), [float(w) for w in obj["weights"]],
                                   dict(obj["part_inputs"]), folder))
            except (DamagedFile, KeyError, TypeError, ValueError) as exc:
                log.warning("%s: the blend in %s is unreadable and is ignored (fit it again to replace it)",
                            exc, folder)
        return found

    def write_blend(self, blend: Blend) -> None:
        write_json(blend.record_path, {"name": blend.name, "parts": blend.parts, "weights": blend.weights,
                                       "part_inputs": blend.part_inputs})

    def write_recipe(self, recipe: Recipe) -> None:
        write_json(recipe.record_path, {"name": recipe.name, "config": recipe.config.to_json(),
                                        "inputs": recipe.inputs})

    def statuses(self) -> list[RecipeStatus]:
        """Every recipe with its state and scores: current ones best first, then the others.

        Raises UserError naming the file when the run's records or features are damaged.
        """
        inputs: dict[tuple[str, ...], dict] = {}
        labels = labels_digest(self.read_run_data().labels)
        out = []
        for recipe in self.recipes():
            sources = tuple(self.feature_sources(recipe.config))
            if sources not in inputs:
                inputs[sources] = self.feature_inputs(sources) if self._extracted(sources) else {}
            current = inputs[sources]
            metrics = recipe.metrics()
            fresh = bool(current) and recipe.inputs.get("features") == current["features"] \
                and recipe.inputs.get("train") == current["train"] and recipe.inputs.get("labels") == labels \
                and recipe.inputs.get("views") == self.views_input(recipe.config).get("views")
            state = "stale" if not fresh else "current" if metrics is not None else "unfinished"
            out.append(RecipeStatus(recipe, state, metrics))
        states = {s.recipe.name: s for s in out}
        for blend in self.blends():
            fresh = all(p in states and states[p].state == "current"
                        and states[p].recipe.inputs == blend.part_inputs.get(p) for p in blend.parts)
            metrics = blend.metrics()
            state = "stale" if not fresh else "current" if metrics is not None else "unfinished"
            out.append(RecipeStatus(blend, state, metrics))
        out.sort(key=lambda s: (s.state != "current", s.oof_log_loss, s.recipe.name))
        return out

    def _extracted(self, sources: Sequence[str]) -> bool:
        """Whether every store of `sources` exists (a recipe may use a scale the run no longer has)."""
        return all(self.store(split, name).meta.exists() for split in SPLITS for name in sources)

    def select_recipe(self, name: str | None = None, command: str = "submit",
                      blends: bool = True) -> "Recipe | Blend":
        """The recipe `name`; with None, the one the last `train` trained; with BEST, the current
        one with the lowest OOF log loss (of the recipes alone, not `blends`, for a command that
        cannot score blends). UserError if there is none or it cannot be used."""
        statuses = self.statuses()
        train = f"`transfer-ensemble train --run {self.path}`"
        if name is None:
            name = self.read_config_optional().get("heads")
            if name is not None and not any(s.recipe.name == name for s in statuses):
                name = None  # its folder was removed: fall back to the best
        if name == BEST:
            name = None
        if name is not None:
            match = [s for s in statuses if s.recipe.name == name]
            if not match:
                known = ", ".join(s.recipe.name for s in statuses) or "none yet"
                raise UserError(f"--heads {name!r}: the run {self.path} has no such head recipe (it has: "
                                f"{known}). Pass one of those names, or leave --heads out for the best.")
            status = match[0]
            if isinstance(status.recipe, Blend) and status.state != "current":
                parts = ",".join(status.recipe.parts)
                raise UserError(f"The blend {name!r} of {self.path} mixes recipes that were trained again or "
                                f"are no longer current. Train them ({train[:-1]} --heads NAME`), then fit "
                                f"the blend again ({train[:-1]} --blend {parts}`).")
            if status.state == "stale":
                raise UserError(f"The head recipe {name!r} of {self.path} was trained on other features "
                                f"or labels than the run has now (it was extracted again since), so "
                                f"its predictions would be stale. Run {train[:-1]} --heads {name}` "
                                f"to retrain it on the current features, then {command} again.")
            if status.state == "unfinished":
                raise UserError(f"The head recipe {name!r} of {self.path} is unfinished. Run "
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
            raise UserError(f"{self.path} has no trained heads for its current features.{why} "
                            f"Run {train} first.")
        return current[0].recipe

    def fold_test_predictions(self, recipe: Recipe, n_test: int, test_identity: str) -> dict[str, list[np.ndarray]]:
        """Each fold model's test predictions per view, checked to be complete and current."""
        fix = f"Run `transfer-ensemble train --run {self.path} --heads {recipe.name}` again"
        out: dict[str, list[np.ndarray]] = {group: [] for group in recipe.groups}
        for view, fold in recipe.jobs:
            files = recipe.fold(view, fold)
            try:
                done = load_json(files.done)
                if done.get("test_features") != test_identity:
                    raise UserError(f"The test features of {self.path} changed after the head recipe "
                                    f"{recipe.name!r} predicted them (the test images or the extraction "
                                    f"changed). {fix}: it reuses the fold models and predicts the new "
                                    f"test set.")
                out[view].append(load_npy(files.test_pred, (n_test, None)))
            except DamagedFile as exc:
                raise self._damaged(exc, f"{fix}: it retrains or re-predicts that fold") from None
        return out

    def _damaged(self, exc: DamagedFile, fix: str) -> UserError:
        return damaged(exc, fix)

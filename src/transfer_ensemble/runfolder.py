"""The run folder: its layout, its records (config.json, dataset.json, the image check) and its lock.

A run folder is this tool's database, passed from step to step like a training checkpoint. Steps
ask for paths and records; no module outside these three joins path pieces of a run folder: this
one knows the folder's own files and where each feature store and head recipe lives; a store's
files are `store.StoreFiles`; a recipe's and a blend's are `recipes.Recipe`, `recipes.FoldFiles`
and `recipes.Blend`, which `recipes` also reads, checks for staleness and selects::

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
    RUN/heads/<recipe>/<view>/fold<k>/  one fold model and its predictions (`recipes.FoldFiles`)
    RUN/heads/<recipe>/oof_<view>.npy   out-of-fold predictions of each view
    RUN/heads/<recipe>/metrics.json     OOF (and hold-out) scores, the temperature; written last
    RUN/heads/blend-<a>+<b>/blend.json  a blend: its recipes, weights fitted on their OOF
                                    predictions, and what each was trained on; metrics.json
                                    (a recipe or blend name over 200 bytes: its folder is the
                                    name's start and a digest, see `recipes.folder_name`)
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
import logging
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from transfer_ensemble import __version__, backend, plugins, views
from transfer_ensemble.blocks import Blocks
from transfer_ensemble.config import ExtractConfig, TrainConfig, merged, upgrade
from transfer_ensemble.dataset import Dataset, Item
from transfer_ensemble.errors import UserError
from transfer_ensemble.records import DamagedFile, damaged, digest, load_json, load_npy
from transfer_ensemble.storage import run_lock, write_json
from transfer_ensemble.store import StoreFiles, feature_settings

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
PREDICT_SPLIT = "predict"


def package_versions() -> dict:
    versions = {"python": platform.python_version(), "transfer_ensemble": __version__}
    for name in ("tensorflow", "jax", "jaxlib", "torch", "keras", "numpy", "opencv-python-headless",
                 "scikit-learn", "pandas"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def first_missing(path: Path) -> Path | None:
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
class HeldState:
    """What a step reads once while it holds the lock and shares with every step it calls: no other
    process changes these meanwhile, and `RunFolder.write_run_data` (extract) starts them again."""

    run_data: RunData | None = None  # dataset.json
    feature_inputs: dict[Blocks, dict] = field(default_factory=dict)  # by blocks
    holds: dict[Blocks, bool] = field(default_factory=dict)  # by blocks


class RunFolder:
    """One run folder: its paths, its lock, and its records, read with their defaults. Its head
    recipes are read and selected by `recipes`, its feature stores opened by `store`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._held: HeldState | None = None  # while a step holds the lock

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

    # The lock, and what a killed step left.
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the run folder's lock (creating the folder) and remove stale temporary files.

        A folder this call created is removed again when the step is refused (UserError) before
        it computed any features: bad input leaves no empty run folder behind.
        """
        created = first_missing(self.path)
        try:
            with run_lock(self.path):
                self._held = HeldState()
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
        """Record `sections` in config.json (``plugins`` is added to the plug-ins recorded before, as
        `plugins.merge` does; a section given as None is removed). Call only once the step they
        describe has succeeded."""
        config = self.read_config_optional()
        if "plugins" in sections:
            sections["plugins"] = plugins.merge(config.get("plugins"), sections["plugins"])
        config.update(sections)
        for key in [k for k, v in sections.items() if v is None]:
            del config[key]
        config["versions"] = package_versions()
        config["backend"] = backend.name()
        write_json(self.config_path, config)
        return config

    def kept_views(self) -> dict:
        """What a new `extract` keeps of the run's extraction when --views is not given: its views
        beyond the pair, those registered in this process ({} for a new run). A view registered
        elsewhere stays in the stores but is not extracted (said in the log)."""
        saved = self.read_config_optional().get("extract")
        recorded = saved.get("views") if isinstance(saved, dict) else None
        if not isinstance(recorded, list) or all(v in views.PAIR for v in recorded):
            return {}
        unknown = [v for v in recorded if v not in views.REGISTRY]
        if unknown:
            log.info("views of the run not registered in this process, kept in the stores but not extracted "
                     "(pass --plugins MODULE to extract them): %s", ", ".join(unknown))
        kept = [v for v in recorded if v in views.REGISTRY]
        log.info("keeping the run's views %s (pass --views pair to extract the pair alone)", ",".join(kept))
        return {"views": kept}

    def extract_config(self) -> ExtractConfig:
        """The options the run's features were extracted with (an old run's read as it ran: `config.upgrade`)."""
        return ExtractConfig.from_json(upgrade(self.read_config())["extract"], source=str(self.config_path))

    def train_config(self, overrides: dict | None = None) -> TrainConfig:
        """`train`'s options: `overrides` (None = not given) over the last ones recorded. The head is
        the one given, else the default; of the recorded options, the folds and the seed carry
        over, and the head's own options when it is the same head."""
        saved = self.read_config().get("train") or {}
        return merged(TrainConfig, saved, overrides or {}, source=str(self.config_path), head_from_saved=False)

    # dataset.json and the image check
    def read_run_data(self) -> RunData:
        """dataset.json (read once while the lock is held: callers share it and must not change it)."""
        if self._held is not None and self._held.run_data is not None:
            return self._held.run_data
        run_data = self._read_run_data()
        if self._held is not None:
            self._held.run_data = run_data
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
            self._held = HeldState()  # extract recorded new features

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
    def feature_inputs(self, blocks: Blocks) -> dict:
        """The identity of the run's current features of `blocks`: the settings of each source (in
        column order: the recipe's record of its blocks), and each split's rows and views.

        Raises UserError naming the file when a store is damaged. Computed once per set of blocks
        while the lock is held (hashing every store's keys.json is the slow part of
        `recipes.recipe_statuses`).
        """
        held = self._held.feature_inputs if self._held is not None else {}
        if blocks not in held:
            held[blocks] = self._feature_inputs(blocks)
        return copy.deepcopy(held[blocks])

    def _feature_inputs(self, blocks: Blocks) -> dict:
        try:
            self._check_extraction_finished(blocks.sources)
            return {
                "features": {name: feature_settings(load_json(self.store("train", name).meta))
                             for name in blocks.sources},
                **{split: digest([store.identity(blocks.views) for store in self.stores(split, blocks.sources)])
                   for split in SPLITS},
            }
        except DamagedFile as exc:
            raise self._damaged(exc, f"Run `transfer-ensemble extract --data DIR --run {self.path}` "
                                     f"again: it recomputes what is damaged") from None

    def holds(self, blocks: Blocks) -> bool:
        """Whether every block is extracted, complete, for the images the run has now (a recipe's
        blocks may be ones a later `extract` left behind: another scale, or stores of older data).
        Read once per set of blocks while the lock is held."""
        held = self._held.holds if self._held is not None else {}
        if blocks not in held:
            held[blocks] = self._holds(blocks)
        return held[blocks]

    def _holds(self, blocks: Blocks) -> bool:
        run_data = self.read_run_data()
        ids = {"train": [it.id for it in run_data.dataset.train], "test": [it.id for it in run_data.good_test]}
        for split in SPLITS:
            for name in blocks.sources:
                files = self.store(split, name)
                try:
                    meta = load_json(files.meta)
                    if meta.get("ids") != ids[split] or not set(blocks.views) <= set(meta.get("views", views.PAIR)):
                        return False
                    if not all(load_npy(files.done_of(v), (len(ids[split]),), bool).all() for v in blocks.views):
                        return False
                except DamagedFile:
                    return False
        return True

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
        recorded = self.read_config().get("features")
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

    def _damaged(self, exc: DamagedFile, fix: str) -> UserError:
        return damaged(exc, fix)

"""Score new images with a trained run: its backbones and one head recipe, combined as `submit` does.

``Run.load(run_dir)`` reads the run, picks its head recipe (the one the last `train` trained, or
the one named), checks that the backbone weights found now are the ones that recipe was
trained on, and loads its fold models once. ``Run.predict(images)`` then scores image paths
or RGB uint8 arrays.

Paths go through the same on-disk feature stores as ``extract``, in a predict cache (default
``RUN/predict/<key of the image list>/``, or any folder given as `cache_dir`, e.g. when the run
is on read-only storage): memory stays flat whatever the number of images, a progress bar
shows, and a killed prediction resumes where it stopped. Images whose features the run already
holds (its train and test images, or images scored before in another list) are copied by
content, not recomputed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import csv
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import numpy as np
import pandas as pd

from transfer_ensemble import backbones, backend, engines, features, images
from transfer_ensemble.config import MAX_PIXELS, ExtractConfig
from transfer_ensemble.dataset import IMAGE_EXTENSIONS, list_images
from transfer_ensemble.engines import EngineConfig, engine_config
from transfer_ensemble.errors import UserError
from transfer_ensemble.options import describe, python_whole
from transfer_ensemble.recipes import Blend, Recipe, select_recipe
from transfer_ensemble.runfolder import PREDICT_SPLIT, SPLITS, PredictCache, RunFolder, first_missing
from transfer_ensemble.scoring import Scorer, mix
from transfer_ensemble.storage import FolderBusy, atomic_path, run_lock, write_json
from transfer_ensemble.store import StoreFiles, source_key, store_meta
from transfer_ensemble.views import whole_passes

log = logging.getLogger(__name__)

FORMATS = ("probabilities", "top-k")
PATH_COLUMNS = ("path", "image", "file", "filepath")
SCORE_CHUNK = 4096


@dataclass
class Run:
    """A trained run folder, ready to score images: its backbones, classes and one recipe's fold models."""

    folder: RunFolder
    classes: list[str]
    scorer: Scorer
    extract_config: ExtractConfig
    extractors: list[features.Extractor] = field(repr=False)  # one per scale the recipe uses

    @property
    def recipe(self) -> Recipe:
        return self.scorer.recipe

    @property
    def models(self) -> dict[str, list]:
        """The recipe's fold models per group."""
        return self.scorer.models

    @property
    def extractor(self) -> features.Extractor:
        """The first scale's extractor."""
        return self.extractors[0]

    @classmethod
    def load(cls, run_dir: str | Path, weights: str | None = None,
             heads_name: str | None = None) -> "Run | BlendRun":
        """Read a trained run; `weights` (imagenet, random or a folder) defaults to the run's own,
        `heads_name` to the recipe the last `train` trained ("best": the current recipe or blend
        with the lowest OOF log loss). A blend gives a `BlendRun` of its recipes' Runs.

        Raises UserError when the weights found now differ from those the recipe was trained on.
        Reads the run folder only: it may be on read-only storage.
        """
        backend.check_available()
        run = RunFolder.existing(run_dir, "predict with")
        recipes = _parts(run, _select_recipe(run, heads_name))
        runs = [cls._open(run, recipe, weights) for recipe in recipes[1:]]
        return runs[0] if isinstance(recipes[0], Recipe) else BlendRun(recipes[0], runs)

    @classmethod
    def _open(cls, run: RunFolder, recipe: Recipe, weights: str | None) -> "Run":
        """`load` once the run folder is read and its recipe chosen."""
        saved = run.extract_config()
        if weights is None and saved.weights not in ("imagenet", "random") \
                and not Path(saved.weights).expanduser().is_dir():
            raise _weights_folder_gone(run, saved.weights)
        extractors = [features.Extractor(config, scale)
                      for config, scale in _extract_configs(saved, recipe, weights or saved.weights)]
        for extractor in extractors:
            _check_feature_identity(run, recipe, extractor, weights_given=weights is not None)
        classes = run.read_run_data().dataset.classes
        return cls(run, classes, Scorer.load(run, recipe), extractors[0].config, extractors)

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def n_models(self) -> int:
        return self.scorer.n_models

    def predict(self, images_or_paths: Sequence[str | os.PathLike | np.ndarray] | np.ndarray,
                tta: bool = True, batch_size: int | None = None,
                cache_dir: str | Path | None = None, engine: str | EngineConfig | None = None) -> np.ndarray:
        """Class probabilities (images, classes) in the order of `self.classes`.

        Each item is an image path or an RGB uint8 array (height, width, 3); a 4-d uint8 array
        is a batch of them. With `tta` (the default) the models score the views they score in the
        submission; without it, the original view only (other views' own models are left out).
        Paths use the on-disk feature stores (under `cache_dir`, default RUN/predict/), arrays
        are scored in memory, in this process. `engine` names one of ``engines.ENGINES`` (or is an
        EngineConfig) to compute the features of paths and score them there; None is "local", here.
        One path given alone (not in a list) is one image.
        """
        if batch_size is not None:
            batch_size = python_whole("Run.predict", "batch_size", batch_size, 1, "--batch-size")
        if isinstance(images_or_paths, (str, os.PathLike)):
            images_or_paths = [images_or_paths]
        items = list(images_or_paths) if not isinstance(images_or_paths, np.ndarray) \
            else list(images_or_paths) if images_or_paths.ndim == 4 else [images_or_paths]
        _check_items(items)
        if not items:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        if any(isinstance(it, np.ndarray) for it in items):
            return self._predict_in_memory(items, tta, batch_size)
        paths = [Path(p).expanduser().resolve() for p in items]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{len(missing)} images do not exist: {_first_few(missing)}.")
        where = engines.get(engine_config(engine))
        keys = check_images(paths, self.extract_config.max_pixels)
        stores, _ = self.extract(paths, keys, batch_size, cache_dir, where)
        return np.concatenate([p for _, p in self.iter_probabilities(stores, len(paths), tta, engine=where)])

    def extract(self, paths: Sequence[Path], keys: Sequence[str], batch_size: int | None = None,
                cache_dir: str | Path | None = None,
                engine: engines.Engine | None = None) -> tuple[list[StoreFiles], features.ExtractSummary]:
        """Compute the missing backbone features of `paths` (absolute; `keys` their content hashes)
        with `engine` (``engines.get``; default local), in the feature cache `cache` names.

        Returns the stores, one per backbone and scale, and the extraction's counts and timing
        (an image counts as computed when it was at any scale; the seconds are all scales').
        """
        engine = engine or engines.get(engine_config(None))
        root = Path(cache_dir).expanduser() if cache_dir is not None else None
        cache = self.cache(keys, cache_dir)
        others = [c for c in self.folder.predict_caches(root) if c != cache]
        if root is not None:
            others += self.folder.predict_caches()

        def donors(name: str) -> list[StoreFiles]:
            return [self.folder.store(split, name) for split in SPLITS] + [c.store(name) for c in others]

        extractors = [self._extractor(extractor, batch_size) for extractor in self.extractors]
        stores, runs = [], []
        with _cache_lock(cache, root is None, self.run_dir):
            cache.remove_stale_temporaries()
            write_json(cache.images, [str(p) for p in paths])
            for extractor in extractors:
                key = functools.partial(source_key, scale=extractor.scale)
                runs.append(engine.extract_split(
                    extractor, PREDICT_SPLIT, paths, [str(i) for i in range(len(paths))], keys,
                    lambda name: cache.store(key(name)), lambda name: donors(key(name))))
            stores = [cache.store(name) for name in self.recipe.blocks.sources]
        computed = max(r.computed for r in runs)
        return stores, replace(runs[0], computed=computed, reused=runs[0].images - computed,
                               seconds=sum(r.seconds for r in runs), cpu_seconds=sum(r.cpu_seconds for r in runs))

    def cache(self, keys: Sequence[str], cache_dir: str | Path | None = None) -> PredictCache:
        """The feature cache of the images whose content hashes are `keys`: under `cache_dir`, else
        under RUN/predict/."""
        return self.folder.predict_cache(keys, Path(cache_dir).expanduser() if cache_dir is not None else None)

    def iter_probabilities(self, stores: Sequence[StoreFiles], n: int, tta: bool = True,
                           chunk: int = SCORE_CHUNK, engine: "engines.Engine | str | EngineConfig | None" = None
                           ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, probabilities) for consecutive chunks of the stored features, in row order,
        scored by `engine` (an engine from ``engines.get``, or its name or config; default local)."""
        if engine is None or isinstance(engine, (str, EngineConfig)):
            engine = engines.get(engine_config(engine))
        return engine.score(self.scorer, stores, n, tta, chunk)

    def _extractor(self, extractor: features.Extractor, batch_size: int | None) -> features.Extractor:
        if batch_size is None or batch_size == self.extract_config.batch_size:
            return extractor
        extractor = copy.copy(extractor)
        extractor.config = replace(self.extract_config, batch_size=batch_size)
        return extractor

    def _predict_in_memory(self, items: list, tta: bool, batch_size: int | None) -> np.ndarray:
        for extractor in self.extractors:
            extractor.ensure_weights_known()
        batch_size = batch_size or self.extract_config.batch_size
        views = self.recipe.predicted_views(tta)
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            by_store: dict[str, dict[str, np.ndarray]] = {}
            for extractor, spec in ((e, spec) for e in self.extractors for spec in e.specs):
                size = extractor.size(spec)
                pixels = [_as_model_input(it, size, start + i) for i, it in enumerate(chunk)]
                computed = extractor.forward(spec, np.stack(pixels), whole_passes(self.recipe.views, views))
                names = [source_key(name, extractor.scale) for name in extractor.store_names(spec)]
                widths = np.cumsum([spec.width, spec.mid_width][:len(names)])[:-1]
                for view in views:
                    for name, columns in zip(names, np.split(computed[view], widths, axis=1)):
                        by_store.setdefault(name, {})[view] = columns
            sources = self.recipe.blocks.sources
            out.append(self.scorer.combine({view: np.concatenate([by_store[name][view] for name in sources], axis=1)
                                            for view in views}))
        return np.concatenate(out)


@dataclass
class BlendRun:
    """A trained run whose recipe is a blend: a `Run` per recipe it mixes, their probabilities
    mixed as the submission mixes them (`scoring.mix`)."""

    blend: Blend
    parts: list[Run]

    @property
    def classes(self) -> list[str]:
        return self.parts[0].classes

    @property
    def n_models(self) -> int:
        return sum(part.n_models for part in self.parts)

    def predict(self, images_or_paths: Sequence[str | os.PathLike | np.ndarray] | np.ndarray,
                tta: bool = True, batch_size: int | None = None,
                cache_dir: str | Path | None = None, engine: str | EngineConfig | None = None) -> np.ndarray:
        """As `Run.predict`, each recipe's probabilities mixed with the blend's weights and temperature."""
        return mix(self.blend, [part.predict(images_or_paths, tta, batch_size, cache_dir, engine)
                                for part in self.parts])


def _parts(run: RunFolder, chosen: "Recipe | Blend") -> list:
    """[the recipe, itself] or [the blend, each recipe it mixes]."""
    if isinstance(chosen, Recipe):
        return [chosen, chosen]
    return [chosen] + [select_recipe(run, name, "predict") for name in chosen.parts]


def _extract_configs(saved: ExtractConfig, recipe: Recipe, weights: str) -> list[tuple[ExtractConfig, float]]:
    """The extraction that computes a recipe's blocks for new images, one per scale they are at:
    the run's settings with `weights`, the recipe's views and, at each scale, its backbones (with
    their middle layer where it uses one)."""
    out = []
    for scale in recipe.blocks.scales:
        sources = recipe.blocks.at_scale(scale)
        out.append((replace(saved, backbones=tuple(dict.fromkeys(s.backbone for s in sources)), weights=weights,
                            mid_layer=any(s.mid for s in sources), views=recipe.views), scale))
    return out


def _weights_folder_gone(run: RunFolder, weights: str) -> UserError:
    """The run's --weights folder is not there: pass it again (or, for a path recorded relative by
    runs before the folder was recorded absolute, run from where `extract` ran)."""
    fix = "Pass --weights with a folder holding the same weight files (they are checked against the run's)."
    if Path(weights).expanduser().is_absolute():
        return UserError(f"The run {run.path} was extracted with the weights in {weights}, which is no longer "
                         f"a folder. {fix}")
    return UserError(f"The run {run.path} was extracted with the weights in {weights}, a path recorded relative "
                     f"to the folder `extract` ran in (runs record it absolute now), and it is not a folder from "
                     f"here ({Path.cwd()}). Run predict from that folder, or: {fix}")


def _select_recipe(run: RunFolder, heads_name: str | None) -> "Recipe | Blend":
    """The recipe or blend predict scores with (as `submit` picks it)."""
    return select_recipe(run, heads_name, "predict")


def _cache_lock(cache: PredictCache, in_run: bool, run_dir: Path) -> contextlib.AbstractContextManager:
    """The predict cache's own lock; a clear error when its folder cannot be made (now) or another
    predict holds it (on entering)."""
    created = first_missing(cache.folder)
    try:
        cache.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = ("a part of that path is an existing file, not a folder"
               if exc.errno in (errno.ENOTDIR, errno.EEXIST) else exc.strerror)
        hint = (f"The run folder {run_dir} is only read by predict: pass --cache-dir DIR (cache_dir= in "
                f"Python) with a folder you can write" if in_run else "Pass --cache-dir with a folder you can write")
        raise UserError(f"Cannot create the feature cache {cache.folder}: {why}. {hint}.") from None
    return _hold_cache_lock(cache, created)


@contextlib.contextmanager
def _hold_cache_lock(cache: PredictCache, created: Path | None = None) -> Iterator[None]:
    """Hold the cache's lock; refused clearly while another predict scores the same images into it.
    A folder `created` for it is removed again when the lock cannot be taken (a full disk, say)."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(run_lock(cache.folder))
        except FolderBusy as exc:
            raise UserError(f"Another predict (pid {exc.owner}) is scoring the same images right now, into "
                            f"the feature cache {cache.folder}. Wait for it to finish, then run this again: "
                            f"it reuses the features that one computed. Or pass --cache-dir (cache_dir= in "
                            f"Python) with another folder to compute them separately now.") from None
        except UserError:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        yield


def _check_items(items: list) -> None:
    """Refuse what is neither an image path nor a non-empty RGB uint8 array, naming it."""
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray):
            if item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8 and not item.size:
                raise UserError(f"Image {index} is an empty array of shape {item.shape}; pass RGB uint8 arrays "
                                f"of shape (height, width, 3) with at least one pixel, or image paths.")
        elif not isinstance(item, (str, os.PathLike)) or not str(item).strip():
            raise UserError(f"Image {index} is {item!r} ({describe(item)}); pass image paths or RGB uint8 arrays "
                            f"of shape (height, width, 3).")


def _as_model_input(item, size: int, index: int) -> np.ndarray:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise UserError(f"Image {index} is an array of shape {item.shape} and type {item.dtype}; "
                            f"pass RGB uint8 arrays of shape (height, width, 3), or image paths.")
        return images.resize(item, size)
    try:
        return images.load(item, size)
    except images.ImageReadError as exc:
        raise UserError(f"The image {item} {exc}.") from None


def _check_feature_identity(run: RunFolder, recipe: Recipe, extractor: features.Extractor,
                            weights_given: bool) -> None:
    """Refuse weights, image size, precision or preprocessing other than the recipe was trained on."""
    trained = recipe.inputs.get("features", {})
    extractor.ensure_weights_known()
    for spec in extractor.specs:
        names = [n for n in extractor.store_names(spec) if source_key(n, extractor.scale) in trained]
        if not names:
            raise UserError(f"The head recipe {recipe.name!r} of {run.path} records no {spec.name} features, "
                            f"so the weights cannot be checked. Train it again on this run.")
        now = store_meta(spec, extractor.sources[spec.name], extractor.config, [], extractor.scale,
                         mid=names[0] != spec.name)
        now.pop("ids")
        then = trained[source_key(names[0], extractor.scale)]
        drawn = backbones.random_backend(then["weights"])
        if backbones.random_backend(now["weights"]) and drawn not in (None, backend.name()):
            raise UserError(
                f"The run {run.path} was extracted with random {spec.name} weights drawn by Keras on "
                f"{drawn} (identity {then['weights']}); this process runs Keras on {backend.name()}, "
                f"whose random weights differ. Run predict with KERAS_BACKEND={drawn}.")
        if now["weights"] != then["weights"]:
            asked = (f"--weights {extractor.config.weights}" if weights_given
                     else f"the run's own --weights {extractor.config.weights}")
            raise UserError(
                f"The {spec.name} weights found now ({asked}, identity {now['weights']}) are not the "
                f"ones the run {run.path} was trained on (identity {then['weights']}). Its heads only "
                f"make sense on features from those weights. Pass --weights with the weights the run "
                f"was extracted with (see 'extract' in {run.config_path}), or train a new run "
                f"with these weights.")
        # Another Keras backend is no reason to refuse: its features agree within float32 rounding
        # (docs/backends.md), as they do across TensorFlow versions, which are not checked either.
        differing = sorted(k for k in now if k in then and k != "backend" and now[k] != then[k])
        if differing:
            detail = ", ".join(f"{k}: {then[k]!r} then, {now[k]!r} now" for k in differing)
            raise UserError(f"The {spec.name} features would not be computed as in the run {run.path} "
                            f"({detail}). Score with the transfer-ensemble version that trained the run, "
                            f"or train a new run.")


def _first_few(values: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def find_images(source: str | Path) -> tuple[list[Path], list[str]]:
    """The images named by a folder (recursively) or a CSV: absolute paths and the names to write."""
    source = Path(source).expanduser()
    if source.is_dir():
        root = source.resolve()
        paths = list_images(root, recursive=True)
        if not paths:
            raise UserError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                            f"in it or its subfolders.")
        return paths, [str(p.relative_to(root)) for p in paths]
    if source.is_file():
        return _images_from_csv(source)
    raise UserError(f"--images {source} does not exist. Pass a folder of images or a CSV with a "
                    f"column of image paths.")


def _images_from_csv(path: Path) -> tuple[list[Path], list[str]]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}). Pass a folder of images or a CSV "
                        f"with a header and one image path per row.") from None
    if frame.empty or not len(frame.columns):
        raise UserError(f"{path} has no rows: it must have a header and one image path per row.")
    by_name = {str(c).strip().lower(): c for c in frame.columns}
    column = next((by_name[c] for c in PATH_COLUMNS if c in by_name), frame.columns[0])
    names = [str(v).strip() for v in frame[column]]
    base = path.resolve().parent
    paths = [(base / Path(v).expanduser()).resolve() for v in names]
    empty = [str(i + 2) for i, v in enumerate(names) if not v]
    if empty:
        raise UserError(f"{path}: the {column!r} column is empty on lines {_first_few(empty)}.")
    missing = [v for v, p in zip(names, paths) if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images named in the {column!r} column of {path} do not exist "
                        f"(relative paths are read from {base}): {_first_few(missing)}.")
    return paths, names


def check_images(paths: Sequence[Path], max_pixels: int = MAX_PIXELS) -> list[str]:
    """Read and decode every image once; their content hashes, or UserError listing every bad one."""
    results = images.inspect_all(paths, max_pixels=max_pixels)
    bad = [(path, r.reason) for path, r in zip(paths, results) if r.reason is not None]
    if bad:
        raise UserError(f"{len(bad)} images cannot be decoded (nothing was scored):\n{images.listing(bad)}\n"
                        f"Fix or remove them (or leave them out of the CSV) and run the same command again.")
    return [r.sha256 for r in results]


def _header(fmt: str, classes: Sequence[str], k: int) -> list[str]:
    if fmt == "probabilities":
        return ["image", *classes]
    return ["image"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")]


def _rows(fmt: str, names: Sequence[str], probabilities: np.ndarray, classes: Sequence[str],
          k: int) -> Iterator[list]:
    if fmt == "probabilities":
        for name, row in zip(names, probabilities):
            yield [name, *(f"{v:.8g}" for v in row)]
        return
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    for name, row, best in zip(names, probabilities, order):
        yield [name] + [v for c in best for v in (classes[c], f"{row[c]:.8g}")]


def _write_csv(f: TextIO, fmt: str, names: Sequence[str], chunks: Iterator[tuple[int, np.ndarray]],
               classes: Sequence[str], k: int) -> dict[str, int]:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(_header(fmt, classes, k))
    top = np.zeros(len(classes), dtype=np.int64)
    for start, probabilities in chunks:
        writer.writerows(_rows(fmt, names[start:start + len(probabilities)], probabilities, classes, k))
        top += np.bincount(probabilities.argmax(axis=1), minlength=len(classes))
    return {classes[c]: int(top[c]) for c in np.argsort(-top, kind="stable") if top[c]}


@dataclass(frozen=True)
class PredictResult:
    """What `predict_to_csv` wrote: the CSV and its format (`k` classes a row for top-k), the
    recipe, its models and the `views` they scored (`tta` as asked); the features computed and reused (in the
    feature `cache`) and the seconds that took, the whole call's seconds, and how many images
    each class was the most likely for (most first)."""

    out: Path
    images: int
    classes: int
    format: str
    k: int
    models: int
    views: tuple[str, ...]
    tta: bool
    recipe: str
    computed: int
    reused: int
    extract_seconds: float
    seconds: float
    cache: Path
    predicted: dict[str, int]


def predict_to_csv(run_dir: str | Path, source: str | Path, out: str | Path, fmt: str = "probabilities",
                   k: int = 5, tta: bool = True, batch_size: int | None = None,
                   weights: str | None = None, heads_name: str | None = None,
                   cache_dir: str | Path | None = None, engine: str | EngineConfig | None = None) -> PredictResult:
    """Score the images of a folder or CSV with a trained run and write `out` atomically.

    `engine` names one of ``engines.ENGINES`` (or is an EngineConfig): where the features are
    computed and scored (default local). The run folder is read, and the engine connected, once.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    k = python_whole("predict_to_csv", "k", k, 1, "--k")
    if batch_size is not None:
        batch_size = python_whole("predict_to_csv", "batch_size", batch_size, 1, "--batch-size")
    config = engine_config(engine)
    backend.check_available()
    folder = RunFolder.existing(run_dir, "predict with")
    chosen, *recipes = _parts(folder, _select_recipe(folder, heads_name))
    where = engines.get(config)
    paths, names = find_images(source)
    keys = check_images(paths, folder.extract_config().max_pixels)
    runs = [Run._open(folder, recipe, weights) for recipe in recipes]
    classes = runs[0].classes
    if fmt == "top-k" and k > len(classes):
        log.info("--k %d is more than the %d classes: writing all %d", k, len(classes), len(classes))
        k = len(classes)
    start = time.perf_counter()
    extracted = [run.extract(paths, keys, batch_size, cache_dir, where) for run in runs]
    chunks = [run.iter_probabilities(stores, len(paths), tta, engine=where)
              for run, (stores, _) in zip(runs, extracted)]
    if isinstance(chosen, Blend):
        chunks = [((parts[0][0], mix(chosen, [p for _, p in parts])) for parts in zip(*chunks))]
    out = Path(out)
    with atomic_path(out, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        predicted = _write_csv(f, fmt, names, chunks[0], classes, k)
    views = tuple(dict.fromkeys(v for run in runs for v in run.recipe.predicted_views(tta)))
    summaries = [summary for _, summary in extracted]
    computed = max(s.computed for s in summaries)
    return PredictResult(out, len(paths), len(classes), fmt, k,
                         sum(run.scorer.models_scoring(run.recipe.predicted_views(tta)) for run in runs), views, tta,
                         chosen.name, computed, len(paths) - computed, sum(s.seconds for s in summaries),
                         time.perf_counter() - start, runs[0].cache(keys, cache_dir).folder, predicted)

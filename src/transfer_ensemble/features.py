"""Stream images through the frozen backbones into on-disk feature arrays, once per image.

For each split and backbone the run folder holds ``features/<split>/<backbone>/``:

* ``meta.json``: what the features depend on besides the images (backbone, weights identity,
  image size, precision, preprocessing), and the image ids in row order;
* ``keys.json``: each row's image as (relative path, size in bytes, mtime in ns);
* ``original.npy`` and ``flipped.npy``: float32 (rows, width), written as memory maps;
* ``done.npy``: which rows are complete, replaced atomically after each batch.

A batch's rows are marked done only after their features are flushed to disk, so a process
killed at any moment loses at most the batch in flight. Features whose meta matches are reused;
when only the image list changed, rows of images seen before are copied, not recomputed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from transfer_ensemble import backbones, images
from transfer_ensemble.dataset import Item
from transfer_ensemble.errors import UserError
from transfer_ensemble.storage import read_json, read_json_optional, write_json, write_npy

log = logging.getLogger(__name__)

VIEWS = ("original", "flipped")
PREPROCESS = "opencv-imdecode-rgb;area-or-linear-resize;keras-preprocess_input-in-graph;flip=lr"
PRECISIONS = ("float32", "bfloat16")
COPY_CHUNK = 1024


@dataclass(frozen=True)
class ExtractConfig:
    backbones: tuple[str, ...] = backbones.DEFAULT_BACKBONES
    weights: str = "imagenet"
    image_size: int | None = None
    batch_size: int = 32
    precision: str = "float32"
    seed: int = 0

    def size_of(self, spec: backbones.BackboneSpec) -> int:
        return self.image_size or spec.size

    def to_json(self) -> dict:
        return {**asdict(self), "backbones": list(self.backbones)}


def image_key(root: Path, path: Path) -> list:
    stat = path.stat()
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = str(path)
    return [rel, stat.st_size, stat.st_mtime_ns]


@dataclass
class Store:
    """One split's features for one backbone: ``.npy`` files on disk plus the in-memory done mask.

    The feature files are mapped only while a batch is written, so resident memory does not grow
    with the number of images as it would with pages of a long-lived memory map.
    """

    folder: Path
    done: np.ndarray

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray], commit: bool = True) -> None:
        """Write each view's rows and flush them to disk; then, if `commit`, mark the rows done."""
        for view, array in values.items():
            target = np.load(self.folder / f"{view}.npy", mmap_mode="r+")
            target[rows] = array
            target.flush()
            del target
        if commit:
            self.done[rows] = True
            write_npy(self.folder / "done.npy", self.done)


def _open_store(folder: Path, meta: dict, keys: list, width: int) -> Store:
    """Open or create the store so that it matches `meta` and `keys`, reusing what it can."""
    old_meta = read_json_optional(folder / "meta.json")
    same_meta = old_meta is not None and {k: v for k, v in old_meta.items() if k != "ids"} == \
        {k: v for k, v in meta.items() if k != "ids"}
    if same_meta and (folder / "done.npy").exists():
        old_keys = read_json(folder / "keys.json")
        if old_keys == keys:
            if old_meta.get("ids") != meta.get("ids"):
                write_json(folder / "meta.json", meta)
            return _map_store(folder)
        return _rebuild_with_reuse(folder, meta, keys, width, old_keys)
    if folder.exists():
        shutil.rmtree(folder)
    return _new_store(folder, meta, keys, width)


def _new_store(folder: Path, meta: dict, keys: list, width: int,
               reuse: tuple[np.ndarray, np.ndarray] | None = None) -> Store:
    """Write a fresh store beside `folder` and swap it in with one rename.

    `reuse` = (new rows, old rows) copies finished rows from the store being replaced, in chunks
    so that memory stays flat.
    """
    staging = folder.with_name(folder.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    done = np.zeros(len(keys), dtype=bool)
    for view in VIEWS:
        np.lib.format.open_memmap(staging / f"{view}.npy", mode="w+", dtype=np.float32,
                                  shape=(len(keys), width)).flush()
        _reserve(staging / f"{view}.npy")
    if reuse is not None:
        new_rows, old_rows = reuse
        for start in range(0, len(new_rows), COPY_CHUNK):
            part = slice(start, start + COPY_CHUNK)
            rows = {view: np.array(np.load(folder / f"{view}.npy", mmap_mode="r")[old_rows[part]])
                    for view in VIEWS}
            Store(staging, done).write(new_rows[part], rows, commit=False)
        done[new_rows] = True
    write_npy(staging / "done.npy", done)
    write_json(staging / "keys.json", keys)
    write_json(staging / "meta.json", meta)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return _map_store(folder)


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now: a full disk then fails here with ENOSPC, a clear error,
    instead of killing the process with SIGBUS when a memory-mapped page is first written."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _map_store(folder: Path) -> Store:
    return Store(folder, np.load(folder / "done.npy").copy())


def _rebuild_with_reuse(folder: Path, meta: dict, keys: list, width: int, old_keys: list) -> Store:
    """The image list changed: keep the rows of images seen before, in their new order."""
    old_done = np.load(folder / "done.npy")
    old_row = {tuple(k): i for i, k in enumerate(old_keys) if old_done[i]}
    pairs = [(new, old_row[tuple(k)]) for new, k in enumerate(keys) if tuple(k) in old_row]
    new_rows = np.array([p[0] for p in pairs], dtype=np.int64)
    old_rows = np.array([p[1] for p in pairs], dtype=np.int64)
    store = _new_store(folder, meta, keys, width, reuse=(new_rows, old_rows))
    log.info("%s: the image list changed; reused %d of %d rows, %d to compute",
             folder, len(new_rows), len(keys), len(keys) - len(new_rows))
    return store


def _store_meta(spec: backbones.BackboneSpec, source: backbones.WeightsSource, config: ExtractConfig,
                ids: list[str]) -> dict:
    return {
        "backbone": spec.name,
        "width": spec.width,
        "weights": source.identity,
        "image_size": config.size_of(spec),
        "precision": config.precision,
        "preprocess": PREPROCESS,
        "ids": ids,
    }


@contextlib.contextmanager
def _precision_policy(precision: str):
    if precision == "float32":
        yield
        return
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _multi_gpu_strategy():
    """MirroredStrategy over all GPUs when there are several; None with one GPU or none."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        log.info("extracting on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return None


@dataclass
class Backbone:
    """A built model and the function that runs it, preprocessing included, on a uint8 RGB batch."""

    model: object
    run: Callable[[np.ndarray], np.ndarray]


def _single_device_runner(model, spec: backbones.BackboneSpec, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Cast, ``preprocess_input`` and the model as one graph, traced now for any batch size.

    Preprocessing in the graph runs fused on TensorFlow's threads instead of as NumPy passes on
    the thread that feeds the model, and the batch crosses into TensorFlow as uint8 (4x smaller).
    XLA is used where Keras would use it for ``predict`` (``jit_compile`` resolves to a GPU
    being present and every layer supporting it); never on a CPU-only machine.
    """
    import tensorflow as tf

    preprocess = backbones.preprocess_input(spec)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
                 jit_compile=bool(model.jit_compile))
    def run(batch):
        return tf.cast(model(preprocess(tf.cast(batch, tf.float32)), training=False), tf.float32)

    run.get_concrete_function()
    return lambda batch: run(batch).numpy()


def _multi_device_runner(model, spec: backbones.BackboneSpec) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` splits each batch across the strategy's replicas (``predict_on_batch`` would
    give every replica the whole batch and return each replica's copy)."""
    preprocess = backbones.preprocess_fn(spec)
    return lambda batch: model.predict(preprocess(batch), batch_size=len(batch), verbose=0)


@dataclass
class Extractor:
    """Backbones built on first use and kept for every split of one extraction."""

    config: ExtractConfig
    _models: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.specs = [backbones.get_spec(n) for n in self.config.backbones]
        self.sources = {s.name: backbones.resolve_weights(s, self.config.weights, self.config.seed)
                        for s in self.specs}
        if self.config.weights == "random":
            log.warning("--weights random: the backbones are untrained, so features and scores mean "
                        "nothing. Use this only for tests and smoke runs.")
        if self.config.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.config.precision!r}.")

    @functools.cached_property
    def strategy(self) -> object | None:
        """MirroredStrategy when there are several GPUs, else None; looked up at the first build."""
        return _multi_gpu_strategy()

    def model(self, spec: backbones.BackboneSpec) -> Backbone:
        if spec.name not in self._models:
            strategy = self.strategy
            size = self.config.size_of(spec)
            scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
            with _precision_policy(self.config.precision), scope:
                model = backbones.build(spec, self.sources[spec.name], size, self.config.seed)
            run = (_multi_device_runner(model, spec) if strategy is not None
                   else _single_device_runner(model, spec, size))
            self._models[spec.name] = Backbone(model, run)
            if self.sources[spec.name].path is None and self.config.weights == "imagenet":
                self.sources[spec.name] = backbones.resolve_weights(spec, "imagenet")
        return self._models[spec.name]

    def prepare(self, specs: Sequence[backbones.BackboneSpec]) -> None:
        """Build the models of `specs` now, and log how long that took."""
        missing = [s for s in specs if s.name not in self._models]
        if not missing:
            return
        start = time.perf_counter()
        for spec in missing:
            self.model(spec)
        log.info("built %s in %.1f s", ", ".join(s.name for s in missing), time.perf_counter() - start)

    def ensure_weights_known(self) -> None:
        """Build (and so download) ImageNet backbones whose weight file is not cached yet."""
        missing = [s for s in self.specs if self.sources[s.name].identity == "imagenet:download"]
        for spec in missing:
            try:
                self.model(spec)
            except Exception as exc:  # Keras raises a plain Exception when a download fails.
                raise backbones.WeightsUnavailableError(backbones.offline_message(missing, exc)) from None

    def forward(self, spec: backbones.BackboneSpec, pixels: np.ndarray) -> np.ndarray:
        """Pooled features of uint8 RGB `pixels` (batch, h, w, 3), as float32."""
        return np.asarray(self.model(spec).run(pixels), dtype=np.float32)


def extract_split(extractor: Extractor, features_dir: Path, split: str, items: Sequence[Item],
                  root: Path) -> dict:
    """Compute the missing features of one split; returns counts and timing for the summary.

    The models are built before the clock starts, so ``seconds`` (and the bar's rate and ETA)
    measure extraction alone: reading, decoding, the forward passes and the writes.
    """
    extractor.ensure_weights_known()
    keys = [image_key(root, it.path) for it in items]
    ids = [it.id for it in items]
    config = extractor.config
    stores = {}
    for spec in extractor.specs:
        meta = _store_meta(spec, extractor.sources[spec.name], config, ids)
        stores[spec.name] = _open_store(features_dir / split / spec.name, meta, keys, spec.width)
    cached = {name: int(store.done.sum()) for name, store in stores.items()}
    _log_reuse(split, len(items), cached)
    extractor.prepare([s for s in extractor.specs if cached[s.name] < len(items)])

    start, cpu_start = time.perf_counter(), time.process_time()
    computed = 0
    paths = [it.path for it in items]
    by_size: dict[int, list[backbones.BackboneSpec]] = {}
    for spec in extractor.specs:
        if cached[spec.name] < len(items):
            by_size.setdefault(config.size_of(spec), []).append(spec)
    for size, specs in by_size.items():
        todo = np.zeros(len(items), dtype=bool)
        for spec in specs:
            todo |= ~stores[spec.name].done
        rows = np.flatnonzero(todo)
        desc = f"extract {split} [{','.join(s.name for s in specs)} @{size}px]"
        with tqdm(total=len(rows), desc=desc, unit="img", dynamic_ncols=True) as bar:
            for batch in _batches(paths, rows, size, config.batch_size):
                n = len(batch.rows)
                for spec in specs:
                    store = stores[spec.name]
                    need = ~store.done[batch.rows]
                    if not need.any():
                        continue
                    out = extractor.forward(spec, batch.pixels)
                    store.write(batch.rows[need], {"original": out[:n][need], "flipped": out[n:][need]})
                bar.update(n)
        computed += len(rows)
    seconds = time.perf_counter() - start
    return {"split": split, "images": len(items), "computed": computed,
            "reused": len(items) - computed, "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_start,
            "backbones": {name: {"computed": len(items) - cached[name], "reused": cached[name]}
                          for name in stores}}


def _log_reuse(split: str, images: int, cached: dict[str, int]) -> None:
    """One line saying which cached features this split reuses, when it reuses any."""
    if not any(cached.values()):
        return
    if all(n == images for n in cached.values()):
        log.info("%s: all %d images' features are cached and match (%s): nothing to compute",
                 split, images, ", ".join(cached))
        return
    parts = [f"{name} {n}/{images}" for name, n in cached.items()]
    log.info("%s: reusing cached features that match (%s); computing the rest", split, ", ".join(parts))


def _batches(paths: list[Path], rows: np.ndarray, size: int, batch_size: int):
    try:
        yield from images.iter_batches(paths, rows, size, batch_size, mirrored=True)
    except images.ImageReadError as exc:
        raise UserError(f"An image could not be decoded during extraction: {exc}. Run the same command "
                        f"again: the image check will list every bad image.") from None


def load_features(features_dir: Path, split: str, backbone_names: Sequence[str], view: str,
                  expected_ids: Sequence[str] | None = None) -> np.ndarray:
    """The concatenated features of one split and view, in the backbones' order."""
    parts = []
    for name in backbone_names:
        folder = features_dir / split / name
        try:
            done = np.load(folder / "done.npy")
            meta = read_json(folder / "meta.json")
        except FileNotFoundError:
            raise UserError(f"No {name} features for the {split} split in {folder}. "
                            f"Run `transfer-ensemble extract` on this run folder first.") from None
        if not done.all():
            raise UserError(f"The {name} features of the {split} split in {folder} are incomplete "
                            f"({int(done.sum())} of {len(done)} images). Run `transfer-ensemble "
                            f"extract` again: it resumes where it stopped.")
        if expected_ids is not None and meta["ids"] != list(expected_ids):
            raise UserError(f"The features in {folder} are for other images than the run's data set. "
                            f"Run `transfer-ensemble extract` again to bring them up to date.")
        parts.append(np.load(folder / f"{view}.npy", mmap_mode="r"))
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

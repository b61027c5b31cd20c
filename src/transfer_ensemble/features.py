"""Stream images through the frozen backbones into on-disk feature stores, once per image.

A store (``runfolder.StoreFiles``) holds one split's features of one backbone, one array per
view (``views``), rows keyed by the SHA-256 of each image file; each view has its own done mask,
so a view added to a store is computed alone. A batch's rows are marked done only after their features are
flushed to disk, so a process killed at any moment loses at most the few batches in flight (one
on the device, one being fetched, and up to `Writer.DEPTH` waiting to be written). A store
whose settings match is reused; rows of images it (or a donor store with the same settings)
already holds are copied, not recomputed; a damaged store is said so and rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from transfer_ensemble import backbones, backend, images, progress, views
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.runfolder import DamagedFile, StoreFiles, feature_settings, load_json, load_npy
from transfer_ensemble.storage import write_json, write_npy

log = logging.getLogger(__name__)

STORE_VERSION = 2  # rows keyed by the SHA-256 of the image file
COPY_CHUNK = 1024


def _masks(files: StoreFiles, held: Sequence[str], n: int, read: bool) -> dict[str, np.ndarray]:
    """Each held view's done mask (views sharing a mask file share the array): read, or all False."""
    by_file: dict[Path, np.ndarray] = {}
    for view in held:
        path = files.done_of(view)
        if path not in by_file:
            by_file[path] = load_npy(path, (n,), bool).copy() if read else np.zeros(n, dtype=bool)
    return {view: by_file[files.done_of(view)] for view in held}


@dataclass
class Store:
    """An open store: its files, the in-memory done mask of each view it holds, and the views
    this extraction wants (`done` is their rows done in every one of them).

    The feature files are mapped only while a batch is written, so resident memory does not grow
    with the number of images as it would with pages of a long-lived memory map.
    """

    files: StoreFiles
    masks: dict[str, np.ndarray]
    views: tuple[str, ...] = views.PAIR

    @property
    def done(self) -> np.ndarray:
        """Rows done in every wanted view."""
        return np.logical_and.reduce([self.masks[v] for v in self.views])

    def missing_views(self, rows: np.ndarray) -> tuple[str, ...]:
        """The wanted views some of `rows` lack."""
        return tuple(v for v in self.views if not self.masks[v][rows].all())

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray], commit: bool = True) -> None:
        """Write each view's rows and flush them to disk; then, if `commit`, mark them done in those views."""
        for view, array in values.items():
            target = np.load(self.files.view(view), mmap_mode="r+")
            target[rows] = array
            target.flush()
            del target
        if commit:
            for view in values:
                self.masks[view][rows] = True
            for path in {self.files.done_of(view) for view in values}:
                write_npy(path, self.masks[next(v for v in values if self.files.done_of(v) == path)])

    def write_missing(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """`write` and commit those of `rows` (with their `values`) not done yet, by done mask."""
        by_mask: dict[Path, list[str]] = {}
        for view in values:
            by_mask.setdefault(self.files.done_of(view), []).append(view)
        for group in by_mask.values():
            need = ~self.masks[group[0]][rows]
            if need.any():
                self.write(rows[need], {view: values[view][need] for view in group})


class Writer:
    """Writes fetched features into their stores and commits them, in order, in one background
    thread, so that the thread feeding the device never waits on the disk.

    Each write ends with an ``msync`` of the feature files and an fsynced, atomic replacement
    of the done mask: about 3 ms a batch of 128 images per backbone on the local disk here, more
    on a network one, against 60 ms for the batch's forward pass on an H200. Up to `DEPTH`
    batches wait; `put` blocks beyond that, and raises an error the thread met (a full disk,
    say), as `close` does.
    """

    DEPTH = 2

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-writer")
        self._pending: deque[Future] = deque()

    def put(self, store: Store, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Queue `Store.write_missing` of `rows`; wait for the oldest write while too many wait."""
        self._pending.append(self._pool.submit(store.write_missing, rows, values))
        while len(self._pending) > self.DEPTH:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait until everything queued is written and committed."""
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        """Wait for the queued writes, also when the block raised: features already computed are
        kept (a resumed run will not compute them again); only the block's error is raised."""
        if exc is None:
            self.close()
            return
        for future in self._pending:
            with contextlib.suppress(Exception):
                future.result()
        self._pool.shutdown()


@dataclass
class _Contents:
    """A readable store's records: its settings, row keys and each held view's done mask."""

    files: StoreFiles
    meta: dict
    keys: list
    masks: dict[str, np.ndarray]


def held_views(meta: dict) -> tuple[str, ...]:
    """The views a store holds (stores from before views were recorded hold the pair)."""
    return tuple(meta.get("views", views.PAIR))


def _read_contents(files: StoreFiles) -> _Contents:
    """Read and check a store's records and the shapes of its arrays; DamagedFile otherwise."""
    meta = load_json(files.meta)
    keys = load_json(files.keys, list)
    held = held_views(meta)
    if not set(views.PAIR) <= set(held) or not set(held) <= set(views.REGISTRY):
        raise DamagedFile(files.meta, f"lists views {list(held)}, not the pair and known views")
    masks = _masks(files, held, len(keys), read=True)
    width = meta.get("width")
    for view in held:
        load_npy(files.view(view), (len(keys), width), np.float32, mmap=True)
    return _Contents(files, meta, keys, masks)


def _readable(files: StoreFiles, consequence: str) -> _Contents | None:
    """The store's contents, or None when it does not exist or is damaged (said once, in the log,
    with the `consequence`)."""
    if not files.folder.exists():
        return None
    try:
        return _read_contents(files)
    except DamagedFile as exc:
        log.warning("%s: %s", exc, consequence)
        return None


def open_store(files: StoreFiles, meta: dict, keys: list[str], donors: Sequence[StoreFiles] = (),
               wanted: Sequence[str] = views.PAIR) -> Store:
    """Open or create the store so that it matches `meta` and `keys` and holds the `wanted`
    views, reusing what it can.

    Finished rows of images (by content) that this store or a `donor` with the same settings
    already holds are copied into place, view by view; a view the store lacks is added empty
    (its other views are kept); the rest are left to compute.
    """
    wanted = tuple(wanted)
    what = f"the {meta['backbone']} features in {files.folder}"
    current = _readable(files, f"recomputing {what}")
    if current is not None and feature_settings(current.meta) == feature_settings(meta) and current.keys == keys:
        held = held_views(current.meta)
        added = [v for v in wanted if v not in held]
        for view in added:
            _new_view(files, view, len(keys), meta["width"])
        record = {**meta, "views": [v for v in views.REGISTRY if v in held or v in added]}
        if current.meta != record:  # other ids, new views, or a record from before the backend was recorded
            write_json(files.meta, record)
        return Store(files, _masks(files, record["views"], len(keys), read=True), wanted)
    sources = [current] if current is not None and feature_settings(current.meta) == feature_settings(meta) else []
    for donor in donors:
        if donor != files:
            contents = _readable(donor, f"its features are not reused (the store {donor.folder} is left "
                                        f"as it is)")
            if contents is not None and feature_settings(contents.meta) == feature_settings(meta):
                sources.append(contents)
    if current is not None and not sources:
        log.info("%s were computed with other settings: computing them again", what)
    return _new_store(files, meta, keys, sources, wanted)


def _new_view(files: StoreFiles, view: str, rows: int, width: int) -> None:
    """An empty view array (disk reserved) and, for a view with a mask of its own, its empty mask."""
    np.lib.format.open_memmap(files.view(view), mode="w+", dtype=np.float32, shape=(rows, width)).flush()
    _reserve(files.view(view))
    if files.done_of(view) != files.done or not files.done.exists():
        write_npy(files.done_of(view), np.zeros(rows, dtype=bool))


def _new_store(files: StoreFiles, meta: dict, keys: list[str], sources: Sequence[_Contents],
               wanted: tuple[str, ...]) -> Store:
    """Write a fresh store of the `wanted` views beside `files` and swap it in with one rename.

    Rows found in `sources` are copied view by view in chunks, so that memory stays flat.
    """
    staging = files.staging()
    if staging.folder.exists():
        shutil.rmtree(staging.folder)
    staging.folder.mkdir(parents=True)
    held = tuple(v for v in views.REGISTRY if v in wanted)
    for view in held:
        _new_view(staging, view, len(keys), meta["width"])
    store = Store(staging, _masks(staging, held, len(keys), read=False), held)
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)  # an image listed several times: every row
    reused = {view: 0 for view in held}
    for source in sources:
        done_before = {view: mask.copy() for view, mask in store.masks.items()}  # the pair shares one mask
        for view in (v for v in held if v in source.masks):
            pairs = [(new, old) for old, key in enumerate(source.keys) if source.masks[view][old] and key in rows_of
                     for new in rows_of[key] if not done_before[view][new]]
            new_rows = np.array([p[0] for p in pairs], dtype=np.int64)
            old_rows = np.array([p[1] for p in pairs], dtype=np.int64)
            for start in range(0, len(new_rows), COPY_CHUNK):
                part = slice(start, start + COPY_CHUNK)
                rows = np.array(np.load(source.files.view(view), mmap_mode="r")[old_rows[part]])
                store.write(new_rows[part], {view: rows}, commit=False)
            store.masks[view][new_rows] = True
            reused[view] += len(new_rows)
    for path in {staging.done_of(view): view for view in held}.items():
        write_npy(path[0], store.masks[path[1]])
    write_json(staging.keys, keys)
    write_json(staging.meta, {**meta, "views": list(held)})
    if files.folder.exists():
        shutil.rmtree(files.folder)
    staging.folder.rename(files.folder)
    if sources:
        log.info("%s: reused %d of %d rows from earlier features, %d to compute",
                 files.folder, min(reused.values()), len(keys), len(keys) - min(reused.values()))
    return Store(files, _masks(files, held, len(keys), read=True), held)


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now: a full disk then fails here with ENOSPC, a clear error,
    instead of killing the process with SIGBUS when a memory-mapped page is first written."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def store_meta(spec: backbones.BackboneSpec, source: backbones.WeightsSource, config: ExtractConfig,
               ids: list[str], scale: float = 1.0) -> dict:
    """What a store's features depend on besides the images, and its ids in row order."""
    return {
        "backbone": spec.name,
        "width": spec.width,
        "weights": source.identity,
        "image_size": config.size_of(spec, scale),
        "precision": config.precision,
        **backbones.settings(spec),
        "store_version": STORE_VERSION,
        "backend": backend.name(),
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


@dataclass
class Backbone:
    """A built model and its compiled forward passes (views and preprocessing included) on uint8
    RGB batches: `run` of the paper's pair, the others (one per group of views sharing a crop,
    ``views.passes``) compiled on first use."""

    model: object
    run: backend.Forward
    compile: Callable[[tuple[str, ...]], backend.Forward] = field(repr=False, default=None)
    passes: dict = field(default_factory=dict, repr=False)

    def forward(self, group: tuple[str, ...]) -> backend.Forward:
        """The compiled pass of one group of views."""
        if group == views.PAIR:
            return self.run
        if group not in self.passes:
            self.passes[group] = self.compile(group)
        return self.passes[group]


@dataclass
class Extractor:
    """Backbones built on first use and kept for every split of one extraction, at one of the
    config's scales."""

    config: ExtractConfig
    scale: float = 1.0
    _models: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        specs = [backbones.get_spec(n) for n in self.config.backbones]
        self.sources = {s.name: backbones.resolve_weights(s, self.config.weights, self.config.seed)
                        for s in specs}
        self.specs = [backbones.bind(s, self.sources[s.name]) for s in specs]
        if self.config.weights == "random":
            log.warning("--weights random: the backbones are untrained, so features and scores mean "
                        "nothing. Use this only for tests and smoke runs.")

    @functools.cached_property
    def replicas(self) -> backend.Replicas | None:
        """Every device, when there are several (``backend.replicated``); looked up at the first build."""
        return backend.replicated()

    def model(self, spec: backbones.BackboneSpec) -> Backbone:
        if spec.name not in self._models:
            replicas = self.replicas
            size = self.size(spec)
            scope = replicas.scope() if replicas is not None else contextlib.nullcontext()
            with _precision_policy(self.config.precision), scope:
                model = backbones.build(spec, self.sources[spec.name], size, self.config.seed)
            def compile_pass(group: tuple[str, ...], model=model, spec=spec, size=size) -> backend.Forward:
                return backend.compile_forward(model, backbones.preprocess_input(spec), size,
                                               self.config.batch_size, replicas, group)

            self._models[spec.name] = Backbone(model, compile_pass(views.PAIR), compile_pass)
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
            log.info("building %s (%s weights) at %d px: this takes a few seconds", spec.name,
                     self.sources[spec.name].kind, self.size(spec))
            self.model(spec)
        log.info("built %s in %.1f s", ", ".join(s.name for s in missing), time.perf_counter() - start)

    def ensure_weights_known(self) -> None:
        """Build (and so download) ImageNet backbones whose weight file is not cached yet."""
        missing = [s for s in self.specs if backbones.needs_download(self.sources[s.name])]
        for spec in missing:
            try:
                self.model(spec)
            except Exception as exc:  # Keras raises a plain Exception when a download fails.
                raise backbones.WeightsUnavailableError(backbones.offline_message(missing, exc)) from None

    def size(self, spec: backbones.BackboneSpec) -> int:
        """The input size `spec` runs at in this extractor."""
        return self.config.size_of(spec, self.scale)

    def forward(self, spec: backbones.BackboneSpec, pixels: np.ndarray,
                wanted: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Pooled float32 features of uint8 RGB images `pixels` (n, h, w, 3) in each of the
        `wanted` views (default: the config's): {"original": (n, width), "flipped": ..., ...}."""
        return self.dispatch(spec, pixels, wanted)()

    def dispatch(self, spec: backbones.BackboneSpec, pixels: np.ndarray,
                 wanted: Sequence[str] | None = None) -> Callable[[], dict[str, np.ndarray]]:
        """Launch the forward passes of `pixels` now (one per group of views sharing a crop); the
        returned function waits for their features."""
        backbone = self.model(spec)
        groups = views.passes(self.config.views if wanted is None else wanted)
        launched = [(group, backbone.forward(group), None) for group in groups]
        launched = [(group, forward, forward.dispatch(pixels)) for group, forward, _ in launched]
        n = len(pixels)

        def result() -> dict[str, np.ndarray]:
            out = {}
            for group, forward, handle in launched:
                stacked = forward.fetch(handle)
                out.update({view: stacked[k * n:(k + 1) * n] for k, view in enumerate(group)})
            return out

        return result


def extract_split(extractor: Extractor, split: str, paths: Sequence[Path], ids: Sequence[str],
                  keys: Sequence[str], store_of: Callable[[str], StoreFiles],
                  donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: ()) -> dict:
    """Compute the missing features of one split's images; returns counts and timing for the summary.

    `keys` are the images' content hashes (``images.inspect``); `store_of(backbone)` is where
    each backbone's features go and `donors_of(backbone)` other stores to copy known rows from.
    The models are built before the clock starts, so ``seconds`` (and the bar's rate and ETA)
    measure extraction alone: reading, decoding, the forward passes and the writes.
    """
    config = extractor.config
    stores = open_stores(extractor, split, ids, keys, store_of, donors_of)
    n = len(paths)
    cached = {name: int(store.done.sum()) for name, store in stores.items()}
    extractor.prepare([s for s in extractor.specs if cached[s.name] < n])

    start, cpu_start = time.perf_counter(), time.process_time()
    computed = 0
    with Writer() as writer:
        for size, specs, rows in pending_by_size(extractor, stores):
            desc = f"extract {split} [{','.join(s.name for s in specs)} @{size}px]"
            with progress.bar(total=len(rows), desc=desc, unit="img") as bar:
                previous: tuple[list[_Pending], int] = ([], 0)
                for batch in _batches(list(paths), rows, size, config):
                    launched = [_Pending(stores[spec.name], batch.rows,
                                         extractor.dispatch(spec, batch.pixels, stores[spec.name].missing_views(batch.rows)))
                                for spec in specs if stores[spec.name].missing_views(batch.rows)]
                    _finish(*previous, writer, bar)
                    previous = (launched, len(batch.rows))
                _finish(*previous, writer, bar)
            computed += len(rows)
    return split_summary(split, n, computed, cached, start, cpu_start)


@dataclass
class _Pending:
    """A batch's forward pass of one backbone, launched; its rows are written once it is fetched."""

    store: Store
    rows: np.ndarray
    result: Callable[[], dict[str, np.ndarray]]


def _finish(in_flight: list[_Pending], images: int, writer: Writer, bar) -> None:
    """Fetch the launched passes of the previous batch (of `images`) and hand them to the writer."""
    for item in in_flight:
        writer.put(item.store, item.rows, item.result())
    bar.update(images)


def open_stores(extractor: Extractor, split: str, ids: Sequence[str], keys: Sequence[str],
                store_of: Callable[[str], StoreFiles],
                donors_of: Callable[[str], Sequence[StoreFiles]]) -> dict[str, Store]:
    """One split's store per backbone, opened (reused, filled from donors or rebuilt); logs what
    they already hold. Both engines start here."""
    extractor.ensure_weights_known()
    stores = {}
    for spec in extractor.specs:
        meta = store_meta(spec, extractor.sources[spec.name], extractor.config, list(ids), extractor.scale)
        stores[spec.name] = open_store(store_of(spec.name), meta, list(keys), donors_of(spec.name),
                                       extractor.config.views)
    _log_reuse(split, len(ids), {name: int(store.done.sum()) for name, store in stores.items()})
    return stores


def pending_by_size(extractor: Extractor,
                    stores: dict[str, Store]) -> list[tuple[int, list[backbones.BackboneSpec], np.ndarray]]:
    """What is left to compute, by input size: (size, the backbones run at it, the rows any of
    them lacks), so each image is decoded once per size."""
    by_size: dict[int, list[backbones.BackboneSpec]] = {}
    for spec in extractor.specs:
        if not stores[spec.name].done.all():
            by_size.setdefault(extractor.size(spec), []).append(spec)
    out = []
    for size, specs in by_size.items():
        todo = np.zeros(len(stores[specs[0].name].done), dtype=bool)
        for spec in specs:
            todo |= ~stores[spec.name].done
        out.append((size, specs, np.flatnonzero(todo)))
    return out


def split_summary(split: str, n: int, computed: int, cached: dict[str, int], start: float,
                  cpu_start: float) -> dict:
    """What `extract_split` returns, on either engine: counts per backbone, wall and CPU seconds."""
    return {"split": split, "images": n, "computed": computed, "reused": n - computed,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "backbones": {name: {"computed": n - done, "reused": done} for name, done in cached.items()}}


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


def _batches(paths: list[Path], rows: np.ndarray, size: int, config: ExtractConfig):
    try:
        yield from images.iter_batches(paths, rows, size, config.batch_size, max_pixels=config.max_pixels)
    except images.ImageReadError as exc:
        raise UserError(f"An image could not be decoded during extraction: {exc}. Run the same command "
                        f"again: the image check will list every bad image.") from None


def load_features(stores: Sequence[StoreFiles], view: str, expected_ids: Sequence[str]) -> np.ndarray:
    """The concatenated features of one view from `stores` (one per backbone, in order).

    Raises DamagedFile when a store is damaged, incomplete or holds other images than
    `expected_ids`.
    """
    parts = []
    for files in stores:
        contents = _read_contents(files)
        if view not in contents.masks:
            raise DamagedFile(files.folder, f"holds no {view} view (it has {', '.join(contents.masks)})")
        done = contents.masks[view]
        if not done.all():
            raise DamagedFile(files.folder, f"is incomplete ({int(done.sum())} of {len(done)} images "
                                            f"in the {view} view)")
        if contents.meta.get("ids") != list(expected_ids):
            raise DamagedFile(files.meta, "lists other images than the run's data set")
        parts.append(np.load(files.view(view), mmap_mode="r"))
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

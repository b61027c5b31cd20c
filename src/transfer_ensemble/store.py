"""The feature store: its files (`StoreFiles`), what its features depend on (`feature_settings`,
`store_meta`), and reading and writing it (`open_store`, `Store`, `Writer`, `load_features`).

A store holds one split's features of one backbone at one scale (``source_key``), one array per
view (``views``), rows keyed by the SHA-256 of each image file; each view has its own done mask,
so a view added to a store is computed without the others (in the pass of its crop group,
``StoreGroup.due_views``, written alone). A store whose settings match is reused; rows of
images it (or a donor store with the same settings) already holds are copied, not recomputed; a
damaged store is said so and rebuilt. `features` computes what a store lacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from transfer_ensemble import backbones, backend, plugins, views
from transfer_ensemble.config import ExtractConfig, scale_label
from transfer_ensemble.records import DamagedFile, digest, load_json, load_npy
from transfer_ensemble.storage import write_json, write_npy

log = logging.getLogger(__name__)

STORE_VERSION = 2  # rows keyed by the SHA-256 of the image file
COPY_CHUNK = 1024


def source_key(backbone: str, scale: float) -> str:
    """The name of a backbone's feature store at one scale: the backbone's own at the first."""
    return backbone if scale == 1.0 else f"{backbone}@{scale_label(scale)}x"


MID = ".mid"


def store_names(spec: backbones.BackboneSpec, mid: bool) -> list[str]:
    """The stores one backbone's pass fills, in the order of its output's columns: its final
    features (named after it), then with `mid` its middle layer's (``xception.mid``)."""
    return [spec.name] + ([spec.name + MID] if mid else [])


def feature_settings(meta: dict) -> dict:
    """What a store's features depend on besides the images and the views: its meta.json without
    the ids and the views (`view_transforms` says what each view's features depend on).

    The Keras backend that computed them is part of it, except TensorFlow's: stores written
    before the backend was recorded were all TensorFlow's, and they keep their identity. The
    views a store holds are not: each view's features stay what they were when a view is added.
    """
    return {k: v for k, v in meta.items()
            if k not in ("ids", "views", TRANSFORMS) and not (k == "backend" and v == "tensorflow")}


TRANSFORMS = "view_transforms"


def view_transforms(meta: dict) -> dict[str, dict | None]:
    """The transform each held view beyond the pair was computed with (`views.View.record`), as the
    store records it; a store from before transforms were recorded had the built-in ones of today
    (None for a view registered elsewhere, which records its own from then on)."""
    recorded = meta.get(TRANSFORMS) or {}
    return {v: recorded.get(v, _registered_transform(v)) for v in held_views(meta) if v not in views.PAIR}


def _registered_transform(view: str) -> dict | None:
    return views.REGISTRY[view].record() if view in views.REGISTRY else None


@dataclass(frozen=True)
class StoreFiles:
    """A feature store: one split's features of one backbone.

    ``meta.json``: what the features depend on besides the images (backbone, width, weights
    identity, image size, precision, preprocessing), the views it holds and the ids in row
    order; ``keys.json``: the SHA-256 of each row's image file; ``<view>.npy`` for each view
    (``original.npy``, ``flipped.npy``, ...): float32 (rows, width); ``done.npy``: which rows
    of the pair (original and flipped) are complete, and ``done_<view>.npy`` of each other
    view, replaced atomically after each batch.
    """

    folder: Path

    @property
    def meta(self) -> Path:
        return self.folder / "meta.json"

    @property
    def keys(self) -> Path:
        return self.folder / "keys.json"

    @property
    def done(self) -> Path:
        return self.folder / "done.npy"

    def view(self, view: str) -> Path:
        return self.folder / f"{view}.npy"

    def done_of(self, view: str) -> Path:
        """The done mask of `view`: the pair shares ``done.npy`` (as stores always have)."""
        return self.done if view in views.PAIR else self.folder / f"done_{view}.npy"

    def staging(self) -> "StoreFiles":
        """Where a replacement store is built before it is renamed over this one."""
        return StoreFiles(self.folder.with_name(self.folder.name + ".new"))

    def identity(self, of_views: Sequence[str] = views.PAIR) -> str:
        """What the features of `of_views` were computed from: their settings, each row's image
        content and each view's transform beyond the pair (so the pair's identity is what it was
        before stores held other views)."""
        meta = load_json(self.meta)
        record = {"meta": feature_settings(meta), "keys": load_json(self.keys, list)}
        transforms = view_transforms(meta)
        beyond = {v: transforms.get(v) for v in of_views if v not in views.PAIR}
        return digest({**record, "views": beyond} if beyond else record)


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
class StoreGroup:
    """The stores one backbone's pass fills, each with its columns of the pass's output (the final
    features', then the middle layer's): written, and done, together."""

    parts: list[tuple[Store, slice]]

    @property
    def views(self) -> tuple[str, ...]:
        return self.parts[0][0].views

    @property
    def done(self) -> np.ndarray:
        """Rows done in every wanted view of every store."""
        return np.logical_and.reduce([store.done for store, _ in self.parts])

    def missing_views(self, rows: np.ndarray) -> tuple[str, ...]:
        """The wanted views some of `rows` lack in some store."""
        lacking = {v for store, _ in self.parts for v in store.missing_views(rows)}
        return tuple(v for v in self.views if v in lacking)

    def due_views(self, rows: np.ndarray) -> tuple[str, ...]:
        """The views to compute for `rows`: every pass (``views.whole_passes``) holding a view some
        of them lack; `write_missing` then writes only what is lacking."""
        return views.whole_passes(self.views, self.missing_views(rows))

    def write_missing(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Each store's `Store.write_missing` of its columns of `values`."""
        for store, columns in self.parts:
            store.write_missing(rows, {view: array[:, columns] for view, array in values.items()})


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
    if not set(views.PAIR) <= set(held) or not all(isinstance(v, str) and plugins.NAME.match(v) for v in held):
        raise DamagedFile(files.meta, f"lists views {list(held)}, not the pair and other view names")
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
    (and the same transform of the view) already holds are copied into place, view by view; a
    view the store lacks is added empty (its other views are kept); a wanted view whose transform
    has changed since is computed again; views not registered in this process are kept as they
    are; the rest are left to compute.
    """
    wanted = tuple(wanted)
    what = f"the {meta['backbone']} features in {files.folder}"
    current = _readable(files, f"recomputing {what}")
    same = current is not None and feature_settings(current.meta) == feature_settings(meta)
    if current is not None:
        _log_unregistered(files, held_views(current.meta))
    if same and current.keys == keys:
        held = held_views(current.meta)
        transforms = view_transforms(current.meta)
        changed = [v for v in wanted if v in transforms and transforms[v] != _registered_transform(v)]
        if changed:
            log.info("%s: views whose transform changed since they were computed, computed again: %s",
                     files.folder, ", ".join(changed))
        for view in [v for v in wanted if v not in held] + changed:
            _new_view(files, view, len(keys), meta["width"])
        kept = _ordered([*held, *wanted])
        transforms.update({v: _registered_transform(v) for v in wanted if v not in views.PAIR})
        record = {**meta, "views": kept, TRANSFORMS: {v: transforms[v] for v in kept if v not in views.PAIR}}
        if current.meta != record:  # other ids, new views, or a record from before the backend was recorded
            write_json(files.meta, record)
        return Store(files, _masks(files, kept, len(keys), read=True), wanted)
    sources = [current] if same else []
    for donor in donors:
        if donor != files:
            contents = _readable(donor, f"its features are not reused (the store {donor.folder} is left "
                                        f"as it is)")
            if contents is not None and feature_settings(contents.meta) == feature_settings(meta):
                sources.append(contents)
    if current is not None and not sources:
        log.info("%s were computed with other settings: computing them again", what)
    recorded = view_transforms(current.meta) if same else {}
    carried = {v: transform for v, transform in recorded.items() if v not in views.REGISTRY}
    return _new_store(files, meta, keys, sources, wanted, carried)


def _ordered(names: Sequence[str]) -> list[str]:
    """View names once each: the registered ones in registry order, then the others as given."""
    return [v for v in views.REGISTRY if v in names] + [v for v in dict.fromkeys(names) if v not in views.REGISTRY]


def _log_unregistered(files: StoreFiles, held: Sequence[str]) -> None:
    unknown = [v for v in held if v not in views.REGISTRY]
    if unknown:
        log.info("%s also holds views not registered in this process, kept as they are, not computed: %s",
                 files.folder, ", ".join(unknown))


def _new_view(files: StoreFiles, view: str, rows: int, width: int) -> None:
    """An empty view array (disk reserved) and, for a view with a mask of its own, its empty mask."""
    np.lib.format.open_memmap(files.view(view), mode="w+", dtype=np.float32, shape=(rows, width)).flush()
    _reserve(files.view(view))
    if files.done_of(view) != files.done or not files.done.exists():
        write_npy(files.done_of(view), np.zeros(rows, dtype=bool))


def _new_store(files: StoreFiles, meta: dict, keys: list[str], sources: Sequence[_Contents],
               wanted: tuple[str, ...], carried: dict[str, dict | None]) -> Store:
    """Write a fresh store of the `wanted` views (and the `carried` views, with their recorded
    transforms: views registered elsewhere) beside `files` and swap it in with one rename.

    Rows found in `sources` (with the same transform of the view) are copied view by view in
    chunks, so that memory stays flat.
    """
    staging = files.staging()
    if staging.folder.exists():
        shutil.rmtree(staging.folder)
    staging.folder.mkdir(parents=True)
    held = tuple(_ordered([v for v in wanted if v in views.REGISTRY] + list(carried)))
    transforms = {v: carried[v] if v in carried else _registered_transform(v) for v in held if v not in views.PAIR}
    for view in held:
        _new_view(staging, view, len(keys), meta["width"])
    store = Store(staging, _masks(staging, held, len(keys), read=False), held)
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)  # an image listed several times: every row
    reused = {view: 0 for view in held}
    for source in sources:
        done_before = {view: mask.copy() for view, mask in store.masks.items()}  # the pair shares one mask
        theirs = view_transforms(source.meta)
        for view in (v for v in held if v in source.masks and theirs.get(v) == transforms.get(v)):
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
    write_json(staging.meta, {**meta, "views": list(held), TRANSFORMS: transforms})
    if files.folder.exists():
        shutil.rmtree(files.folder)
    staging.folder.rename(files.folder)
    computed = [v for v in held if v in wanted]
    if sources:
        least = min(reused[v] for v in computed)
        log.info("%s: reused %d of %d rows from earlier features, %d to compute",
                 files.folder, least, len(keys), len(keys) - least)
    return Store(files, _masks(files, held, len(keys), read=True), tuple(v for v in held if v in wanted))


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now: a full disk then fails here with ENOSPC, a clear error,
    instead of killing the process with SIGBUS when a memory-mapped page is first written."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def store_meta(spec: backbones.BackboneSpec, source: backbones.WeightsSource, config: ExtractConfig,
               ids: list[str], scale: float = 1.0, mid: bool = False) -> dict:
    """What a store's features depend on besides the images, and its ids in row order; with `mid`,
    those of the backbone's middle-layer store."""
    return {
        "backbone": spec.name,
        "width": spec.mid_width if mid else spec.width,
        **({"layer": spec.mid_layer} if mid else {}),
        "weights": source.identity,
        "image_size": config.size_of(spec, scale),
        "precision": config.precision,
        **backbones.settings(spec),
        "store_version": STORE_VERSION,
        "backend": backend.name(),
        "ids": ids,
    }


def rows_done(files: StoreFiles, ids: Sequence[str], wanted: Sequence[str]) -> int:
    """How many of `ids` the store at `files` already holds in every one of the `wanted` views (0
    when it holds other images, or none)."""
    try:
        if load_json(files.meta).get("ids") != list(ids):
            return 0
        masks = [load_npy(files.done_of(view), (len(ids),), bool) for view in wanted]
    except DamagedFile:
        return 0
    return int(np.logical_and.reduce(masks).sum()) if masks else 0


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

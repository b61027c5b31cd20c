"""Stream images through the frozen backbones into on-disk feature stores (`store`), once per image.

An `Extractor` builds each backbone and its compiled passes (views and preprocessing included);
`extract_split` opens a split's stores and computes the rows they lack, batch by batch. A
batch's rows are marked done only after their features are flushed to disk, so a process killed
at any moment loses at most the few batches in flight (one on the device, one being fetched, and
up to `store.Writer.DEPTH` waiting to be written).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from transfer_ensemble import backbones, backend, images, progress, views
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.store import StoreFiles, StoreGroup, Writer, open_store, store_meta, store_names

log = logging.getLogger(__name__)


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
        self.sources = backbones.resolve_all(specs, self.config.weights, self.config.seed)
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
                model = backbones.build(spec, self.sources[spec.name], size, self.config.seed,
                                        mid=self.config.mid_of(spec))
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
        """Build (and so download) ImageNet backbones whose weight file is not cached yet; one
        error for those that could not be fetched, each builder's paragraph with its own cause."""
        failed = {}
        for spec in [s for s in self.specs if backbones.needs_download(self.sources[s.name])]:
            try:
                self.model(spec)
            except UserError:
                raise
            except Exception as exc:  # Keras raises a plain Exception when a download fails.
                failed[spec.name] = exc
        if failed:
            specs = [s for s in self.specs if s.name in failed]
            present = [s.name for s in self.specs if s.name not in failed]
            raise backbones.WeightsUnavailableError(backbones.offline_message(specs, failed)
                                                    + backbones.go_on_without(len(failed), present))

    def store_names(self, spec: backbones.BackboneSpec) -> list[str]:
        """The stores `spec`'s pass fills (``store.store_names``): its final features', then its
        middle layer's where this extraction pools it."""
        return store_names(spec, self.config.mid_of(spec))

    def size(self, spec: backbones.BackboneSpec) -> int:
        """The input size `spec` runs at in this extractor."""
        return self.config.size_of(spec, self.scale)

    def forward(self, spec: backbones.BackboneSpec, pixels: np.ndarray,
                wanted: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Pooled float32 features of uint8 RGB images `pixels` (n, h, w, 3) in each of the
        `wanted` views (default: the config's): {"original": (n, width), "flipped": ..., ...}; with
        the middle layer (``config.mid_of``), its pooled features follow the final ones in each row."""
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
                  donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: ()) -> ExtractSummary:
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
                    due = {spec.name: stores[spec.name].due_views(batch.rows) for spec in specs}
                    launched = [_Pending(stores[spec.name], batch.rows,
                                         extractor.dispatch(spec, batch.pixels, due[spec.name]))
                                for spec in specs if due[spec.name]]
                    _finish(*previous, writer, bar)
                    previous = (launched, len(batch.rows))
                _finish(*previous, writer, bar)
            computed += len(rows)
    return replace(split_summary(split, n, computed, cached, start, cpu_start), scale=extractor.scale)


@dataclass
class _Pending:
    """A batch's forward pass of one backbone, launched; its rows are written once it is fetched."""

    store: StoreGroup
    rows: np.ndarray
    result: Callable[[], dict[str, np.ndarray]]


def _finish(in_flight: list[_Pending], images: int, writer: Writer, bar) -> None:
    """Fetch the launched passes of the previous batch (of `images`) and hand them to the writer."""
    for item in in_flight:
        writer.put(item.store, item.rows, item.result())
    bar.update(images)


def open_stores(extractor: Extractor, split: str, ids: Sequence[str], keys: Sequence[str],
                store_of: Callable[[str], StoreFiles],
                donors_of: Callable[[str], Sequence[StoreFiles]]) -> dict[str, StoreGroup]:
    """One split's stores per backbone (its final features' and, with its middle layer, that
    layer's), opened (reused, filled from donors or rebuilt); logs what they already hold. Both
    engines start here."""
    extractor.ensure_weights_known()
    stores = {}
    for spec in extractor.specs:
        parts, start = [], 0
        for name in extractor.store_names(spec):
            meta = store_meta(spec, extractor.sources[spec.name], extractor.config, list(ids), extractor.scale,
                              mid=name != spec.name)
            store = open_store(store_of(name), meta, list(keys), donors_of(name), extractor.config.views)
            parts.append((store, slice(start, start + meta["width"])))
            start += meta["width"]
        stores[spec.name] = StoreGroup(parts)
    _log_reuse(split, len(ids), {name: int(store.done.sum()) for name, store in stores.items()})
    return stores


def pending_by_size(extractor: Extractor,
                    stores: dict[str, StoreGroup]) -> list[tuple[int, list[backbones.BackboneSpec], np.ndarray]]:
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


@dataclass(frozen=True)
class Counts:
    """One backbone's rows of a split: computed now, and reused from its store or a donor."""

    computed: int
    reused: int


@dataclass(frozen=True)
class ExtractSummary:
    """What extracting one split at one scale did, on either engine: its images, how many were
    computed and reused (per backbone too), and the wall and CPU seconds of the extraction phase."""

    split: str
    images: int
    computed: int
    reused: int
    seconds: float
    cpu_seconds: float
    backbones: dict[str, Counts]
    scale: float = 1.0

    @property
    def rate(self) -> float | None:
        """Images computed per second, or None when none were."""
        return self.computed / self.seconds if self.computed and self.seconds > 0 else None


def split_summary(split: str, n: int, computed: int, cached: dict[str, int], start: float,
                  cpu_start: float) -> ExtractSummary:
    """What `extract_split` returns, on either engine: counts per backbone, wall and CPU seconds
    since `start` and `cpu_start`, at scale 1 (``workflow.extract`` sets each extractor's)."""
    return ExtractSummary(split, n, computed, n - computed, time.perf_counter() - start,
                          time.process_time() - cpu_start,
                          {name: Counts(n - done, done) for name, done in cached.items()})


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

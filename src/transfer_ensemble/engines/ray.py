"""The Ray engine (`--engine ray`): extraction and batch scoring on a Ray cluster, by Ray Data batch inference.

A dataset of image paths with their store rows is decoded and resized by CPU tasks
(``map_batches``), then run through the backbones by a pool of actors (one per GPU, or per
group of CPUs), each building the models once. (Ray Data fuses two steps that reserve the same
resources, so with CPU-only actors the decoding runs inside the actors, next to a forward pass
a hundred times slower; with GPU actors it runs in separate CPU tasks.) The driver, this process, writes the features
that come back into the same feature stores as the local engine (``store.Store``), rows and
then the done mask, chunk by chunk: a killed job loses at most the chunks in flight, and running
it again computes only the rows not done. For `predict`, the heads are then held by a pool of
actors too, each scoring chunks of stored features; the driver writes the CSV in row order.

Every worker reads the images, the weights and the run folder by the same paths as the driver,
so they must be on storage every node sees. Ray is imported only here, and this module only
under ``--engine ray`` (``engines.get``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from transfer_ensemble import features, images, progress
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.scoring import Scorer
from transfer_ensemble.store import StoreFiles

log = logging.getLogger(__name__)

KILL_AFTER_CHUNKS = "TRANSFER_ENSEMBLE_TEST_KILL_AFTER_CHUNKS"
"""Test hook: the driver kills itself (SIGKILL) once it has written this many chunks."""

WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3"}
WRITE_CHUNK_MAX = 4096
"""Most rows the driver writes (and commits with one done-mask write) at once."""
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Pool:
    """The actors that hold the models: how many, and what each reserves on the cluster."""

    actors: int
    gpus: float
    cpus: float

    def describe(self) -> str:
        per = f"{self.gpus:g} GPU + {self.cpus:g} CPU" if self.gpus else f"{self.cpus:g} CPU"
        return f"{self.actors} actor{'s' if self.actors != 1 else ''} ({per} each)"


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine ray needs Ray, which is not installed in this Python environment. "
                        "Install it with `pip install 'transfer_ensemble[ray]'` (or `pip install "
                        "'ray[data]>=2.40'`), or leave --engine out to run here.") from None
    return ray


def address_of(engine: EngineConfig) -> tuple[str | None, str]:
    """The cluster to join (None: start a local Ray) and where that came from, for messages."""
    if engine.options.ray_address:
        return engine.options.ray_address, "--ray-address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def check_address(address: str, source: str = "--ray-address") -> None:
    """Refuse an address where nothing listens, quickly: ray.init would retry for a minute.

    `source` is where the address came from (the flag, or the RAY_ADDRESS variable).
    """
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    fix = ("Start the cluster (`ray start --head` on its head node) and pass the address it prints "
           "(host:6379, or ray://host:10001 for Ray Client), or leave --ray-address and RAY_ADDRESS "
           "unset to start a local Ray for this run.")
    given = "" if source == "--ray-address" else f" (from {source})"
    if not host or not port.isdigit():
        raise UserError(f"{source} {address!r} is not a Ray address of the form host:port. {fix}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"The Ray cluster at {address!r}{given} cannot be reached ({exc.strerror or exc}). "
                        f"{fix}") from None


def _quiet(ray) -> None:
    """Keep Ray's own logs and progress bars off the terminal: the driver shows one bar of its own."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors are raised here, said once
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.verbose_stats_logs = False


def runtime_env() -> dict:
    """What a job's workers need: this package's own code (so they run the driver's version) and quiet logs.

    Pass it to your own ``ray.init(runtime_env=...)`` when you connect before calling this package.
    """
    return {"py_modules": [str(Path(__file__).resolve().parents[1])], "env_vars": WORKER_ENV}


def connect(engine: EngineConfig):
    """Connect to the cluster (`--ray-address`, else RAY_ADDRESS, else start a local Ray); the ray module.

    Reuses a connection this process already has (a Python caller's own ``ray.init``). Workers
    get this package's own code (``py_modules``), so they run the same version as the driver.
    """
    ray = _import_ray()
    _quiet(ray)
    if not ray.is_initialized():
        address, source = address_of(engine)
        if address is not None:
            check_address(address, source)
        start = time.perf_counter()
        try:
            ray.init(address=address or "local", include_dashboard=False if address is None else None,
                     log_to_driver=False, logging_level=logging.ERROR, runtime_env=runtime_env())
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"Could not connect to the Ray cluster at {address!r}, given by {source} ({exc}). "
                            f"Check {source}, or leave --ray-address and RAY_ADDRESS unset to start a "
                            f"local Ray for this run.") from None
        where = f"the Ray cluster at {address}" if address else "a local Ray started for this run"
        log.info("connected to %s in %.1f s: %s", where, time.perf_counter() - start, _resources(ray))
    _quiet(ray)
    return ray


def _resources(ray) -> str:
    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def pool_for(ray, engine: EngineConfig) -> Pool:
    """The actor pool `engine` asks for, resolved against the cluster; UserError when it cannot fit."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    per_gpu = engine.options.gpus_per_actor if engine.options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    per_cpu = engine.options.cpus_per_actor if engine.options.cpus_per_actor is not None else 1.0
    actors = engine.options.actors if engine.options.actors is not None else (max(1, int(gpus // per_gpu)) if per_gpu else 1)
    if per_gpu and actors * per_gpu > gpus:
        raise UserError(f"--actors {actors} with --gpus-per-actor {per_gpu:g} need {actors * per_gpu:g} GPUs, "
                        f"but the Ray cluster has {gpus:g}. Use fewer actors or fewer GPUs per actor "
                        f"(--gpus-per-actor 0 runs the backbones on CPUs).")
    if actors * per_cpu + 1 > cpus:
        raise UserError(f"--actors {actors} with --cpus-per-actor {per_cpu:g} reserve {actors * per_cpu:g} of "
                        f"the Ray cluster's {cpus:g} CPUs and leave less than one to decode images. Use "
                        f"fewer actors or fewer CPUs per actor.")
    return Pool(actors, per_gpu, per_cpu)


class RayEngine:
    """The engine on a Ray cluster: connects (and sizes its actor pool) when built, so a bad address
    or a pool that cannot fit fails before any work."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ray = connect(config)
        self.pool = pool_for(self.ray, config)

    def extract_split(self, extractor: features.Extractor, split: str, paths: Sequence[Path], ids: Sequence[str],
                      keys: Sequence[str], store_of: Callable[[str], StoreFiles],
                      donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: ()) -> dict:
        return extract_split(extractor, split, paths, ids, keys, store_of, donors_of, pool=self.pool)

    def score(self, scorer: Scorer, stores: Sequence[StoreFiles], n: int, tta: bool,
              chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        return iter_probabilities(self.ray, self.pool, scorer, stores, n, tta, chunk)


def _decode(batch: dict, size: int, max_pixels: int) -> dict:
    """A CPU task: each path's image, decoded and resized (RGB uint8, size x size)."""
    pixels = np.stack([images.load(path, size, max_pixels) for path in batch["path"]])
    return {"row": batch["row"], "pixels": pixels}


class _Backbones:
    """An actor's backbones, built once; returns both views' features of each decoded batch."""

    def __init__(self, config: dict, names: list[str], identities: dict[str, str], scale: float = 1.0) -> None:
        self.extractor = features.Extractor(ExtractConfig.from_json(config, source="the driver"), scale)
        self.specs = [spec for spec in self.extractor.specs if spec.name in names]
        self.extractor.ensure_weights_known()
        for spec in self.specs:
            found = self.extractor.sources[spec.name].identity
            if found != identities[spec.name]:
                raise UserError(f"A Ray worker on {socket.gethostname()} finds other {spec.name} weights "
                                f"(identity {found}) than the driver ({identities[spec.name]}). Give every "
                                f"node the same weight files (--weights with a folder on shared storage).")
        self.extractor.prepare(self.specs)

    def __call__(self, batch: dict) -> dict:
        out = {"row": batch["row"]}
        for spec in self.specs:
            for view, values in self.extractor.forward(spec, batch["pixels"]).items():
                out[f"{spec.name}/{view}"] = values
        return out


WORKER_ERROR = re.compile(r"transfer_ensemble\.(?:errors\.UserError|images\.(?:ImageReadError|ImageTooLarge)): (.*)")


def _cause(exc: BaseException) -> BaseException | None:
    """The UserError or ImageReadError a worker raised, through Ray's wrapping; None if neither.

    Ray keeps the exception object of a failed task, but only the text of one raised in an
    actor's constructor (ActorDiedError), so that text is read too.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (UserError, images.ImageReadError)):
            return exc
        found = WORKER_ERROR.search(str(exc))
        if found:
            kind = UserError if "errors.UserError" in found.group(0) else images.ImageReadError
            return kind(found.group(1).strip())
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


@contextlib.contextmanager
def _worker_errors(what: str) -> Iterator[None]:
    """Turn a worker's UserError or bad image into this process's UserError; re-raise the rest."""
    try:
        yield
    except Exception as exc:
        cause = _cause(exc)
        if isinstance(cause, images.ImageReadError):
            raise UserError(f"An image could not be decoded on a Ray worker during {what}: {cause}. "
                            f"Run the same command again: the image check will list every bad "
                            f"image.") from None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


def _kill_hook() -> Callable[[], None]:
    limit = int(os.environ.get(KILL_AFTER_CHUNKS, "0") or 0)
    written = [0]

    def after_chunk() -> None:
        written[0] += 1
        if limit and written[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
    return after_chunk


def write_chunk(batch_size: int, rows: int) -> int:
    """Rows per write: a batch, or 1% of the rows when that is more (at most WRITE_CHUNK_MAX).

    Each write also rewrites the done mask (one byte per row of the split), so on a million
    images chunks of 4096 keep that under 250 bytes per image while a kill loses at most 1%.
    """
    return max(batch_size, min(WRITE_CHUNK_MAX, rows // 100))


def extract_split(extractor: features.Extractor, split: str, paths: Sequence[Path], ids: Sequence[str],
                  keys: Sequence[str], store_of: Callable[[str], StoreFiles],
                  donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: (),
                  pool: Pool = Pool(1, 0.0, 1.0)) -> dict:
    """``features.extract_split`` on the Ray cluster ``connect`` joined: the same stores, the same rows.

    The driver opens the stores (reusing and copying rows as the local engine does), sends the
    rows not done through the decode tasks and the actor pool, and writes each chunk that comes
    back, rows then done mask, as the local engine writes each batch.
    """
    import ray

    config = extractor.config
    stores = features.open_stores(extractor, split, ids, keys, store_of, donors_of)
    n = len(paths)
    cached = {name: int(store.done.sum()) for name, store in stores.items()}
    identities = {name: source.identity for name, source in extractor.sources.items()}
    after_chunk = _kill_hook()

    start, cpu_start = time.perf_counter(), time.process_time()
    computed = 0
    for size, specs, rows in features.pending_by_size(extractor, stores):
        dataset = ray.data.from_items([{"row": int(r), "path": str(paths[r])} for r in rows])
        dataset = dataset.map_batches(_decode, fn_kwargs={"size": size, "max_pixels": config.max_pixels},
                                      batch_size=config.batch_size, num_cpus=1)
        dataset = dataset.map_batches(
            _Backbones, batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_gpus=pool.gpus,
            num_cpus=pool.cpus, fn_constructor_kwargs={"config": config.to_json(),
                                                       "names": [s.name for s in specs],
                                                       "identities": identities,
                                                       "scale": extractor.scale})
        desc = f"extract {split} [{','.join(s.name for s in specs)} @{size}px] on Ray"
        log.info("%s: %d images to compute on %s", split, len(rows), pool.describe())
        launched = time.perf_counter()
        with progress.bar(total=len(rows), desc=desc, unit="img") as bar, _worker_errors("extraction"):
            for chunk in dataset.iter_batches(batch_size=write_chunk(config.batch_size, len(rows)),
                                              batch_format="numpy"):
                if not bar.n:
                    log.info("%s: first features back after %.1f s (starting the actors and building the "
                             "models in them)", split, time.perf_counter() - launched)
                chunk_rows = chunk["row"].astype(np.int64)
                for spec in specs:
                    stores[spec.name].write_missing(chunk_rows, {view: chunk[f"{spec.name}/{view}"]
                                                                  for view in stores[spec.name].views})
                bar.update(len(chunk_rows))
                after_chunk()
        computed += len(rows)
    return features.split_summary(split, n, computed, cached, start, cpu_start)


class _Heads:
    """An actor holding a recipe's fold models; scores ranges of rows of the stored features."""

    def __init__(self, run_dir: str, heads_name: str, stores: list[str], tta: bool) -> None:
        self.scorer = Scorer.open(run_dir, heads_name)
        self.stores = [StoreFiles(Path(folder)) for folder in stores]
        self.tta = tta

    def __call__(self, batch: dict) -> dict:
        rows, probabilities = [], []
        for start, stop in zip(batch["start"], batch["stop"]):
            rows.append(np.arange(start, stop, dtype=np.int64))
            probabilities.append(self.scorer.score_rows(self.stores, int(start), int(stop), self.tta))
        return {"row": np.concatenate(rows), "probabilities": np.concatenate(probabilities)}


def iter_probabilities(ray, pool: Pool, scorer: Scorer, stores: Sequence[StoreFiles], n: int, tta: bool,
                       chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, probabilities) for consecutive runs of rows, scored by actors holding the heads.

    Actors return chunks in any order; they are given back in row order, holding only the chunks
    that arrived ahead of the next one.
    """
    bounds = [{"start": s, "stop": min(n, s + chunk)} for s in range(0, n, chunk)]
    if not bounds:
        return
    args = {"run_dir": str(scorer.run.path.resolve()), "heads_name": scorer.recipe.name,
            "stores": [str(s.folder.resolve()) for s in stores], "tta": tta}
    dataset = ray.data.from_items(bounds).map_batches(
        _Heads, batch_size=1, compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus,
        fn_constructor_kwargs=args)
    waiting: dict[int, np.ndarray] = {}
    following = 0
    with _worker_errors("scoring"):
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows = batch["row"]
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for part_rows, part in zip(np.split(rows, breaks), np.split(batch["probabilities"], breaks)):
                waiting[int(part_rows[0])] = part
            while following in waiting:
                part = waiting.pop(following)
                yield following, part
                following += len(part)

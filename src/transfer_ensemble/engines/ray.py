"""The Ray engine (`--engine ray`): extraction and batch scoring on a Ray cluster, by Ray Data batch inference.

A dataset of image paths with their store rows is run through the backbones by a pool of
actors (one per GPU, or per group of CPUs), each building the models once. CPU actors decode
and resize their own batches (next to a forward pass a hundred times slower); GPU actors get
them from CPU tasks (``map_batches``). The driver, this process, writes the features that come
back into the same feature stores as the local engine (``store.Store``), rows and then the done
mask, chunk by chunk: a killed job loses at most the chunks in flight, and running it again
computes only the rows not done. While it waits for features it watches the cluster's nodes:
when a node is lost and the nodes left have no room for the pool, it stops the run rather than
wait for ever for an actor Ray cannot place. For `predict`, the heads are then held by a pool of
actors too, each scoring chunks of stored features; the driver writes the CSV in row order.

Every worker reads the images, the weights and the run folder by the same paths as the driver,
so they must be on storage every node sees. Ray is imported only here, and this module only
under ``--engine ray`` (``engines.get``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import re
import signal
import socket
import threading
import time
from collections import Counter
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

STALL_NODE = "TRANSFER_ENSEMBLE_TEST_STALL_NODE"
"""Test hook, passed from the driver to its workers: the backbone actors on the Ray node with this
id hold their batches (sleep STALL_S) instead of computing them, so a test can remove that node
while it has work."""
STALL_S = 600.0

WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3"}
WRITE_CHUNK_MAX = 4096
"""Most rows the driver writes (and commits with one done-mask write) at once."""
CONNECT_TIMEOUT_S = 5.0
NODE_CHECK_S = 2.0
"""How often the driver checks, while it waits for features, that the actors still fit on the live nodes."""
STOP_WAIT_S = 10.0
ACTORS_START_TIMEOUT_S = 600
"""How long a split waits for its whole actor pool to start before any work is given out."""


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


def _start_whole_pools(ray) -> None:
    """Give work out only once every actor of a pool has started (so it spreads over all of them),
    and stop with an error when they have not started after ACTORS_START_TIMEOUT_S."""
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTORS_START_TIMEOUT_S


def runtime_env() -> dict:
    """What a job's workers need: this package's own code (so they run the driver's version) and quiet logs.

    Pass it to your own ``ray.init(runtime_env=...)`` when you connect before calling this package.
    """
    hooks = {name: os.environ[name] for name in (STALL_NODE,) if name in os.environ}
    return {"py_modules": [str(Path(__file__).resolve().parents[1])], "env_vars": {**WORKER_ENV, **hooks}}


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
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise UserError(f"Could not connect to the Ray cluster at {address!r}, given by {source} "
                            f"({str(exc).split('. ')[0]}). Check {source}, or leave --ray-address and "
                            f"RAY_ADDRESS unset to start a local Ray for this run.{_token_hint(address)}") from None
        where = f"the Ray cluster at {address}" if address else "a local Ray started for this run"
        log.info("connected to %s in %.1f s: %s", where, time.perf_counter() - start, _resources(ray))
    _quiet(ray)
    _start_whole_pools(ray)
    return ray


def _token_hint(address: str | None) -> str:
    """What to check when a cluster may have refused this process's token (Ray's token authentication)."""
    if address is None:
        return ""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return (" If Ray logged InvalidAuthToken above, this process's token is not the cluster's: give it "
                "the head node's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).")
    return (" If Ray logged InvalidAuthToken above, the cluster uses token authentication (`ray start --head` "
            "turns it on where a token exists, such as ~/.ray/auth_token): set RAY_AUTH_MODE=token here too, "
            "with the head node's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")


def _resources(ray) -> str:
    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def pool_for(ray, engine: EngineConfig) -> Pool:
    """The actor pool `engine` asks for, resolved against the cluster; UserError when it cannot fit."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    asked = engine.options
    per_gpu = asked.gpus_per_actor if asked.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    per_cpu = asked.cpus_per_actor if asked.cpus_per_actor is not None else 1.0
    actors = asked.actors if asked.actors is not None else (max(1, int(gpus // per_gpu)) if per_gpu else 1)
    if per_gpu and actors * per_gpu > gpus:
        raise UserError(f"--actors {actors} with --gpus-per-actor {per_gpu:g} need {actors * per_gpu:g} GPUs, "
                        f"but the Ray cluster has {gpus:g}. Use fewer actors or fewer GPUs per actor "
                        f"(--gpus-per-actor 0 runs the backbones on CPUs).")
    if per_gpu and actors * per_cpu + 1 > cpus:
        raise UserError(f"--actors {actors} with --cpus-per-actor {per_cpu:g} reserve {actors * per_cpu:g} of "
                        f"the Ray cluster's {cpus:g} CPUs and leave less than one to decode images. Use "
                        f"fewer actors or fewer CPUs per actor.")
    if actors * per_cpu > cpus:
        raise UserError(f"--actors {actors} with --cpus-per-actor {per_cpu:g} reserve {actors * per_cpu:g} CPUs, "
                        f"but the Ray cluster has {cpus:g}. Use fewer actors or fewer CPUs per actor.")
    return Pool(actors, per_gpu, per_cpu)


def check_nodes(nodes: Sequence[dict], pool: Pool) -> None:
    """Refuse a pool whose actors do not fit on the cluster's nodes one by one (`nodes` as
    ``ray.nodes()`` gives them): Ray would wait for ever for an actor no node can hold."""
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    places = sum(_actors_on(resources, pool) for resources in alive)
    if places >= pool.actors:
        return
    sizes = ", ".join(f"{r.get('CPU', 0):g} CPU + {r.get('GPU', 0):g} GPU" for r in alive)
    raise UserError(f"{pool.describe()} do not fit on the Ray cluster's nodes ({sizes}): an actor must fit on "
                    f"one node, and these nodes hold {places}. Use fewer CPUs or GPUs per actor "
                    f"(--cpus-per-actor, --gpus-per-actor) or fewer actors (--actors {max(places, 1)}).")


def _actors_on(resources: dict, pool: Pool) -> int:
    """How many of `pool`'s actors one node with `resources` holds."""
    fits = [resources.get("CPU", 0.0) / pool.cpus]
    if pool.gpus:
        fits.append(resources.get("GPU", 0.0) / pool.gpus)
    return int(min(fits) + 1e-9)


class RayEngine:
    """The engine on a Ray cluster: connects (and sizes its actor pool) when built, so a bad address
    or a pool that cannot fit fails before any work."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ray = connect(config)
        self.pool = pool_for(self.ray, config)
        check_nodes(self.ray.nodes(), self.pool)

    def extract_split(self, extractor: features.Extractor, split: str, paths: Sequence[Path], ids: Sequence[str],
                      keys: Sequence[str], store_of: Callable[[str], StoreFiles],
                      donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: ()) -> features.ExtractSummary:
        return extract_split(extractor, split, paths, ids, keys, store_of, donors_of, pool=self.pool)

    def score(self, scorer: Scorer, stores: Sequence[StoreFiles], n: int, tta: bool,
              chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        return iter_probabilities(self.ray, self.pool, scorer, stores, n, tta, chunk)


def _decode(batch: dict, size: int, max_pixels: int) -> dict:
    """A CPU task: each path's image, decoded and resized (RGB uint8, size x size)."""
    pixels = np.stack([images.load(path, size, max_pixels) for path in batch["path"]])
    return {"row": batch["row"], "pixels": pixels}


def _node_id() -> str:
    """The Ray node this worker runs on (as `ray list nodes` shows it)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _features_dataset(ray, extractor: features.Extractor, rows: list[tuple[int, str]], size: int,
                      specs: Sequence, pool: Pool):
    """The Ray Data pipeline of `rows` (store row, image path) to both views' features of `specs`.

    CPU actors decode their own batches (no decode task then waits for a CPU the actors hold);
    GPU actors get them decoded by CPU tasks.
    """
    config = extractor.config
    decode = {"size": size, "max_pixels": config.max_pixels}
    dataset = ray.data.from_items([{"row": row, "path": path} for row, path in rows])
    if pool.gpus:
        dataset = dataset.map_batches(_decode, fn_kwargs=decode, batch_size=config.batch_size, num_cpus=1)
    identities = {name: source.identity for name, source in extractor.sources.items()}
    return dataset.map_batches(
        _Backbones, batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_gpus=pool.gpus, num_cpus=pool.cpus,
        fn_constructor_kwargs={"config": config.to_json(), "names": [s.name for s in specs],
                               "identities": identities, "scale": extractor.scale,
                               "decode": None if pool.gpus else decode})


class _Backbones:
    """An actor's backbones, built once; returns both views' features of each batch, decoding it
    first when given paths (`decode`: the size and pixel limit to decode at)."""

    def __init__(self, config: dict, names: list[str], identities: dict[str, str], scale: float = 1.0,
                 decode: dict | None = None) -> None:
        self.extractor = features.Extractor(ExtractConfig.from_json(config, source="the driver"), scale)
        self.specs = [spec for spec in self.extractor.specs if spec.name in names]
        self.node = _node_id()
        self.extractor.ensure_weights_known()
        for spec in self.specs:
            found = self.extractor.sources[spec.name].identity
            if found != identities[spec.name]:
                raise UserError(f"A Ray worker on host {socket.gethostname()}, node {self.node}, finds other "
                                f"{spec.name} weights (identity {found}) than the driver "
                                f"({identities[spec.name]}). Give every node the same weight files "
                                f"(--weights with a folder on shared storage).")
        self.extractor.prepare(self.specs)
        self.decode = decode

    def __call__(self, batch: dict) -> dict:
        if os.environ.get(STALL_NODE) == self.node:
            time.sleep(STALL_S)
        pixels = batch["pixels"] if self.decode is None else _decode(batch, **self.decode)["pixels"]
        out = {"row": batch["row"], "node": np.full(len(batch["row"]), self.node)}
        for spec in self.specs:
            for view, values in self.extractor.forward(spec, pixels).items():
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


def _actors_timed_out(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is Ray Data's timeout on starting a pool's actors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "GetTimeoutError" and "starting actors" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
        if _actors_timed_out(exc):
            raise UserError(f"The Ray cluster did not start the actors for {what} within "
                            f"{ACTORS_START_TIMEOUT_S} s: its nodes lack the free CPUs or GPUs they reserve "
                            f"(other jobs hold them, or an autoscaler has not added nodes yet). See `ray "
                            f"status`, then run the same command again, with fewer --actors if need be: "
                            f"it computes only what is missing.") from None
        raise


def _watching_nodes(ray, pool: Pool, batches: Iterator[dict], what: str) -> Iterator[dict]:
    """`batches`, taken from Ray Data on a thread of their own while this one watches the nodes.

    Ray restarts an actor lost with its node on another node with room for it, and Ray Data
    hands it the lost work again. When no node has room left, that restart would wait for ever:
    the run stops instead, with a UserError naming the lost nodes. A run that stops keeps every
    chunk written before, so running the same command again computes only the rest. (Ray Data's
    own switch, ``map_batches(max_restarts=0)``, is an extra remote argument, which Ray 2.60
    deprecates; and it would stop the run also where a node left has room.)
    """
    arrived: queue.Queue = queue.Queue(maxsize=2)
    pump = threading.Thread(target=_pump, args=(batches, arrived), daemon=True, name="ray-batches")
    pump.start()
    watch = _NodeWatch(ray, pool, what)
    try:
        while True:
            try:
                kind, value = arrived.get(timeout=NODE_CHECK_S)
            except queue.Empty:
                kind, value = "wait", None
            watch.check()
            if kind == "wait":
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        _stop(pump)


class _Stopped(Exception):
    """Raised in the thread that takes batches from Ray Data, to end it when the run stops."""


def _pump(batches: Iterator[dict], into: queue.Queue) -> None:
    try:
        for batch in batches:
            into.put(("batch", batch))
        into.put(("end", None))
    except _Stopped:
        return
    except BaseException as exc:  # handed to the consuming thread, which raises it
        into.put(("error", exc))


def _stop(pump: threading.Thread) -> None:
    """End `pump` if it still runs (the run stopped before Ray Data finished): an exception raised
    in it closes Ray Data's iterator, which shuts its execution down, rather than leaving it to
    call Ray after this process has disconnected (and so start a new local Ray)."""
    if not pump.is_alive():
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(pump.ident), ctypes.py_object(_Stopped))
    pump.join(timeout=STOP_WAIT_S)


def _alive(nodes: Sequence[dict]) -> dict[str, dict]:
    return {node["NodeID"]: node for node in nodes if node.get("Alive")}


class _NodeWatch:
    """The cluster's nodes during one pipeline, looked at every NODE_CHECK_S: a lost node is logged
    when the nodes left have room for the pool, and stops the run (UserError) when they have not."""

    def __init__(self, ray, pool: Pool, what: str) -> None:
        self.ray, self.pool, self.what = ray, pool, what
        self.started = _alive(ray.nodes())
        self.reported: set[str] = set()
        self.due = time.monotonic() + NODE_CHECK_S

    def check(self) -> None:
        if time.monotonic() < self.due:
            return
        self.due = time.monotonic() + NODE_CHECK_S
        nodes = self.ray.nodes()
        lost = sorted(set(self.started) - set(_alive(nodes)))
        try:
            check_nodes(nodes, self.pool)
        except UserError:
            named = f"lost node{'s' if len(lost) > 1 else ''} {', '.join(lost)}" if lost else "lost nodes"
            raise UserError(f"The Ray cluster {named} during {self.what}, and the nodes left have no room for "
                            f"{self.pool.describe()}. The features written so far are kept: run the same "
                            f"command again once the cluster has its nodes back (or with fewer --actors), and "
                            f"it computes only what is missing.") from None
        for node in set(lost) - self.reported:
            log.warning("The Ray cluster lost node %s during %s: Ray restarts its actors on the nodes left, "
                        "which have room for them.", node, self.what)
            self.reported.add(node)


def _kill_hook() -> Callable[[], None]:
    limit = int(os.environ.get(KILL_AFTER_CHUNKS, "0") or 0)
    written = [0]

    def after_chunk() -> None:
        written[0] += 1
        if limit and written[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
    return after_chunk


def _placement(images_per_node: Counter[str]) -> str:
    """Which nodes computed how many images, for the log: "2 nodes: 8 on node 4f1c..., 7 on node 9a0b..."."""
    parts = ", ".join(f"{n} on node {node}" for node, n in images_per_node.most_common())
    return f"{len(images_per_node)} node{'s' if len(images_per_node) != 1 else ''}: {parts}"


def write_chunk(batch_size: int, rows: int) -> int:
    """Rows per write: a batch, or 1% of the rows when that is more (at most WRITE_CHUNK_MAX).

    Each write also rewrites the done mask (one byte per row of the split), so on a million
    images chunks of 4096 keep that under 250 bytes per image while a kill loses at most 1%.
    """
    return max(batch_size, min(WRITE_CHUNK_MAX, rows // 100))


def extract_split(extractor: features.Extractor, split: str, paths: Sequence[Path], ids: Sequence[str],
                  keys: Sequence[str], store_of: Callable[[str], StoreFiles],
                  donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: (),
                  pool: Pool = Pool(1, 0.0, 1.0)) -> features.ExtractSummary:
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
    after_chunk = _kill_hook()

    start, cpu_start = time.perf_counter(), time.process_time()
    computed = 0
    for size, specs, rows in features.pending_by_size(extractor, stores):
        dataset = _features_dataset(ray, extractor, [(int(r), str(paths[r])) for r in rows], size, specs, pool)
        desc = f"extract {split} [{','.join(s.name for s in specs)} @{size}px] on Ray"
        log.info("%s: %d images to compute on %s", split, len(rows), pool.describe())
        launched = time.perf_counter()
        nodes: Counter[str] = Counter()
        chunks = dataset.iter_batches(batch_size=write_chunk(config.batch_size, len(rows)), batch_format="numpy",
                                      prefetch_batches=0)
        try:
            with progress.bar(total=len(rows), desc=desc, unit="img") as bar, _worker_errors("extraction"):
                for chunk in _watching_nodes(ray, pool, chunks, f"the extraction of {split}"):
                    if not bar.n:
                        log.info("%s: first features back after %.1f s (starting the actors and building the "
                                 "models in them)", split, time.perf_counter() - launched)
                    chunk_rows = chunk["row"].astype(np.int64)
                    for spec in specs:
                        stores[spec.name].write_missing(chunk_rows, {view: chunk[f"{spec.name}/{view}"]
                                                                      for view in stores[spec.name].views})
                    bar.update(len(chunk_rows))
                    nodes.update(chunk["node"].tolist())
                    after_chunk()
        finally:
            if nodes:
                log.info("%s: computed on %s", split, _placement(nodes))
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
    batches = dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    with _worker_errors("scoring"):
        for batch in _watching_nodes(ray, pool, batches, "scoring"):
            rows = batch["row"]
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for part_rows, part in zip(np.split(rows, breaks), np.split(batch["probabilities"], breaks)):
                waiting[int(part_rows[0])] = part
            while following in waiting:
                part = waiting.pop(following)
                yield following, part
                following += len(part)

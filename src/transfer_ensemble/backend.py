"""The one module that imports TensorFlow, JAX or torch: Keras's backend, whichever it is.

Keras picks its backend itself (``KERAS_BACKEND``, else the "backend" of ``keras.json`` in
``$KERAS_HOME`` or ``~/.keras``, else TensorFlow); this module never chooses one. It gives the
rest of the package what differs between backends:

- `name()`: the backend in use, read without importing Keras or a framework;
- `enable_determinism()`: the same results for the same seed;
- `devices()` and `replicated()`: several accelerators (or virtual CPU devices) used together,
  with ``MirroredStrategy`` on TensorFlow and ``keras.distribution.DataParallel`` on JAX;
- `compile_forward()`: a backbone's compiled forward pass on uint8 batches of images, the
  views (``views.transform``: mirrors, crops) and the preprocessing made in the graph, split
  into `Forward.dispatch`
  (transfer and launch) and `Forward.fetch` (wait and copy back) so that a caller can launch the
  next batch before it fetches the current one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from transfer_ensemble.views import PAIR, transform

log = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT = "tensorflow"


def name() -> str:
    """The Keras backend this process uses (or will use), as Keras itself decides it."""
    if "keras" in sys.modules:
        import keras

        return keras.backend.backend()
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(Path(home) / "keras.json") as f:
            return str(json.load(f).get("backend", DEFAULT))
    except (OSError, ValueError, AttributeError):
        return DEFAULT


FRAMEWORKS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
"""The package each Keras backend imports."""


def _choice() -> tuple[str, str]:
    """The backend Keras will pick, and where that choice comes from (for messages)."""
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen, f"KERAS_BACKEND={chosen} (the environment)"
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = Path(home) / "keras.json"
    chosen = name()
    return chosen, (f'the "backend" entry of {path} ({chosen!r})' if path.exists() else f"the default ({chosen})")


def installed() -> list[str]:
    """The Keras backends whose framework is installed here (found without importing it)."""
    return [b for b in BACKENDS if importlib.util.find_spec(FRAMEWORKS[b]) is not None]


def check_available() -> None:
    """UserError, before anything is written, when Keras would start on a backend that is not
    installed (or is no backend): which are installed, and how to pick one."""
    if "keras" in sys.modules:
        return  # Keras started on its backend already
    chosen, where = _choice()
    if chosen in BACKENDS and chosen in installed():
        return
    from transfer_ensemble.errors import UserError

    what = "is not installed here" if chosen in BACKENDS else \
        f"is not a Keras backend (Keras knows {', '.join(BACKENDS)})"
    found = ", ".join(installed()) or "none"
    raise UserError(f"Keras would run on the backend {chosen!r}, from {where}, which {what}. Installed "
                    f"backends: {found}. Pick one with the environment variable KERAS_BACKEND (e.g. "
                    f"`export KERAS_BACKEND={(installed() or [DEFAULT])[0]}`) or the \"backend\" entry of "
                    f"keras.json in $KERAS_HOME (default ~/.keras)"
                    f"{f', or install {chosen}' if chosen in BACKENDS else ''}. Nothing was written.")


def enable_determinism() -> None:
    """Make the backend's ops deterministic, so that a seeded fit gives the same weights each time.

    TensorFlow needs op determinism switched on. JAX on a CPU is deterministic as it is; on a
    GPU, XLA's flag ``--xla_gpu_deterministic_ops=true`` must be in ``XLA_FLAGS`` before JAX
    starts, which this sets only if JAX has not started yet. torch is asked for deterministic
    algorithms (with a warning where an op has none).
    """
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "jax":
        flag = "--xla_gpu_deterministic_ops=true"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)


def devices() -> list[str]:
    """The devices a backbone runs on: every GPU, else the CPUs the backend shows (normally one;
    several only when configured, e.g. for tests: TensorFlow's logical devices, or JAX's
    ``XLA_FLAGS=--xla_force_host_platform_device_count=N``)."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return [d.name for d in found]
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    if backend == "torch":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    return ["default"]


def peak_memory() -> int | None:
    """Peak bytes in use on the first GPU since the process started; None without a GPU."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] if tf.config.list_logical_devices("GPU") else None
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        stats = device.memory_stats() if device.platform == "gpu" else None
        return stats.get("peak_bytes_in_use") if stats else None
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return None


@dataclass
class Replicas:
    """Several devices that each run the same model on part of every batch."""

    backend: str
    devices: list[str]
    handle: Any

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Build models inside this, so that their weights are placed on every device."""
        if self.backend == "tensorflow":
            with self.handle.scope():
                yield
            return
        import keras

        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(self.handle)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)


def replicated() -> Replicas | None:
    """Replicas over every device when there are several and the backend can use them; else None."""
    backend = name()
    found = devices()
    if len(found) < 2:
        return None
    if backend == "tensorflow":
        import tensorflow as tf

        log.info("extracting on %d devices with MirroredStrategy", len(found))
        return Replicas(backend, found, tf.distribute.MirroredStrategy(found))
    if backend == "jax":
        import keras

        log.info("extracting on %d devices with keras.distribution.DataParallel", len(found))
        return Replicas(backend, found, keras.distribution.DataParallel())
    log.info("the %s backend uses one of the %d devices here", backend, len(found))
    return None


@dataclass
class Forward:
    """A backbone's compiled forward pass on uint8 RGB batches of images (n, size, size, 3).

    The pass runs on each of its views of the images (by default the image and its left-right
    mirror), which the graph makes with ``views.transform`` (so only the images cross to the
    device, not every view); its output is the float32 features of the images in the first view,
    then in the second and so on, (len(views) * n, width): the same batch of views, and so the
    same numbers, as making the views on the host would give.

    `dispatch` sends a batch to the device and launches the pass, returning at once where the
    backend allows (JAX and GPUs run asynchronously); `fetch` waits for that pass and returns
    the features. Call `dispatch` for the next batch before `fetch` for this one to overlap the
    transfer and compute of one batch with the copy back and the writing of the other.
    """

    dispatch: Callable[[np.ndarray], Any]
    fetch: Callable[[Any], np.ndarray]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.fetch(self.dispatch(batch))


def compile_forward(model: Any, preprocess: Callable, size: int, batch: int,
                    replicas: Replicas | None = None, views: Sequence[str] = PAIR) -> Forward:
    """The compiled forward of `model` with `preprocess` (a backbone's ``preprocess_input``) on
    `views` of batches of images (`Forward`), compiled now for batches of `batch` images of
    `size` x `size` where the backend compiles per shape."""
    backend = name()
    views = tuple(views)
    if backend == "tensorflow":
        return _tensorflow_forward(model, preprocess, size, replicas, views)
    if backend == "jax":
        return _jax_forward(model, preprocess, size, batch, replicas, views)
    if backend == "torch":
        return _torch_forward(model, preprocess, size, batch, views)
    raise RuntimeError(f"no compiled forward for the Keras backend {backend!r}")


def _tensorflow_forward(model: Any, preprocess: Callable, size: int, replicas: Replicas | None,
                        views: tuple[str, ...]) -> Forward:
    """Cast, ``preprocess_input`` and the model as one ``tf.function``, traced now for any batch size.

    The batch crosses into TensorFlow as uint8 (4x smaller than float32). XLA is used where Keras
    would use it for ``predict`` (``jit_compile`` resolves to a GPU being present and every layer
    supporting it); never on a CPU-only machine. Over several devices, ``predict`` splits each
    batch across the strategy's replicas (``predict_on_batch`` would give every replica the whole
    batch and return each replica's copy).
    """
    import tensorflow as tf

    if replicas is not None:
        def run_replicated(batch: np.ndarray) -> np.ndarray:
            pixels = np.asarray(preprocess(np.asarray(transform(batch, views, size))))
            return model.predict(pixels, batch_size=len(pixels), verbose=0)

        return Forward(run_replicated, lambda out: np.asarray(out, dtype=np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
                 jit_compile=bool(model.jit_compile))
    def run(batch):
        return tf.cast(model(preprocess(transform(batch, views, size)), training=False), tf.float32)

    run.get_concrete_function()
    return Forward(run, lambda out: np.asarray(out.numpy(), dtype=np.float32))


def _jax_forward(model: Any, preprocess: Callable, size: int, batch: int, replicas: Replicas | None,
                 views: tuple[str, ...]) -> Forward:
    """``jax.jit`` over ``model.stateless_call``, with the weights passed in as arguments.

    Batches go to the device as uint8 with ``jax.device_put``, which (like the jitted call)
    returns before the work is done. On a GPU or TPU a batch smaller than `batch` (the last one
    of a split) is padded to it, so that the pass is compiled once, here: padding rows cost
    microseconds there and a compile seconds. On a CPU it is the other way round (a padded row
    costs as much as a real one, a second or more), so each batch size is compiled as it comes.
    Over several devices the batch is split along its first axis (padded to a multiple of the
    device count) and the weights are replicated, as ``keras.distribution.DataParallel`` laid
    them out when the model was built; the views are then made on the host, so that each
    device gets its share of every view without exchanging images with the others.
    """
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    views_in_graph = replicas is None
    count_views = len(views)

    @jax.jit
    def run(trainable, non_trainable, batch):
        import keras

        pixels = transform(batch, views, size) if views_in_graph else batch.astype("float32")
        outputs, _ = model.stateless_call(trainable, non_trainable, preprocess(pixels), training=False)
        return keras.ops.cast(outputs, "float32")

    sharding, count = None, 1
    if replicas is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = replicas.handle.device_mesh.backend_mesh
        sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
        count = mesh.size
    padding = _Padding(batch, count, fixed=jax.devices()[0].platform != "cpu")
    executables: dict[int, Any] = {}

    def executable(images: int) -> Any:
        """The pass compiled ahead of time for batches of `images` (padded) images, without
        running it: a warm-up batch would cost a full forward pass on a CPU."""
        if images not in executables:
            rows, dtype = (images, np.uint8) if views_in_graph else (count_views * images, np.float32)
            shape = jax.ShapeDtypeStruct((rows, size, size, 3), dtype, sharding=sharding)
            executables[images] = run.lower(trainable, non_trainable, shape).compile()
        return executables[images]

    def dispatch(pixels: np.ndarray) -> tuple[Any, int, int]:
        n, pixels = len(pixels), padding.pad(pixels)
        padded = len(pixels)
        if not views_in_graph:
            pixels = np.asarray(transform(pixels, views, size))
        placed = jax.device_put(pixels, sharding) if sharding is not None else jax.device_put(pixels)
        return executable(padded)(trainable, non_trainable, placed), n, padded

    def fetch(handle: tuple[Any, int, int]) -> np.ndarray:
        out, n, padded = handle
        return _unpad(np.asarray(out, dtype=np.float32), n, padded, count_views)

    executable(padding.size)
    return Forward(dispatch, fetch)


@dataclass
class _Padding:
    """Pads a batch of images with blank ones for a pass compiled per batch shape.

    Sizes are rounded up to a multiple of `count` (the devices sharing a batch); with `fixed`,
    also up to the largest batch seen (at first `batch`), so that one shape is compiled.
    """

    batch: int
    count: int = 1
    fixed: bool = True

    def __post_init__(self) -> None:
        self.size = -(-self.batch // self.count) * self.count

    def pad(self, pixels: np.ndarray) -> np.ndarray:
        padded = -(-len(pixels) // self.count) * self.count
        if self.fixed:
            self.size = padded = max(self.size, padded)
        if len(pixels) == padded:
            return pixels
        return np.concatenate([pixels, np.zeros((padded - len(pixels), *pixels.shape[1:]), pixels.dtype)])


def _unpad(out: np.ndarray, n: int, padded: int, count_views: int = 2) -> np.ndarray:
    """The rows of the first `n` images in each of `count_views` views, from a pass over `padded` images."""
    return out if n == padded else np.concatenate([out[k * padded:k * padded + n] for k in range(count_views)])


def _cache_compiled_programs() -> None:
    """Keep JAX's compiled programs on disk (``JAX_COMPILATION_CACHE_DIR``, unless set already).

    On JAX, Keras builds a model by running each layer's initializers eagerly, and each op is
    compiled for its shape first: building Xception and InceptionV3 takes 15 and 30 s of
    compiling on a CPU, against about 2 s each once the programs are cached. The cache lives in
    ``$XDG_CACHE_HOME/transfer_ensemble/jax`` (``~/.cache/...``); deleting it is always safe.
    """
    if name() != "jax":
        return
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    settings = {"JAX_COMPILATION_CACHE_DIR": os.path.join(home, "transfer_ensemble", "jax"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    if "jax" in sys.modules:  # too late for the environment: JAX read it when it was imported
        import jax

        for key in settings:
            current = getattr(jax.config, key.lower())
            jax.config.update(key.lower(), os.environ[key] if isinstance(current, str) or current is None
                              else type(current)(os.environ[key]))


_cache_compiled_programs()


def _torch_forward(model: Any, preprocess: Callable, size: int, batch: int, views: tuple[str, ...]) -> Forward:
    """``torch.compile`` (TorchInductor) over the views, cast, preprocessing and the Keras model,
    run under ``torch.inference_mode`` on the backend's device.

    Compiled, the pass ran twice as fast as Keras's eager torch layers on this 2-core CPU
    (Xception and InceptionV3 at 150 px; features equal to 2e-7) after a compile of 30 to 95 s
    per backbone (TorchInductor caches it on disk for later runs). A compile costs more than
    padding, so every batch is padded to the compiled one, on any device. Where a model does not
    compile, a warning says so and it runs eagerly. The batch is moved to the device as uint8,
    and CUDA kernels run asynchronously until `fetch` copies the result back.
    """
    import torch
    from keras.src.backend.torch.core import get_device

    device = get_device()

    def both_views(pixels):
        return model(preprocess(transform(pixels, views, size)), training=False).float()

    padding = _Padding(batch)
    run = [torch.compile(both_views, dynamic=False)]

    def dispatch(pixels: np.ndarray):
        n, pixels = len(pixels), padding.pad(pixels)
        with torch.inference_mode():
            placed = torch.from_numpy(pixels).to(device, non_blocking=True)
            return run[0](placed), n, len(pixels)

    def fetch(handle) -> np.ndarray:
        out, n, padded = handle
        return _unpad(out.cpu().numpy().astype(np.float32, copy=False), n, padded, len(views))

    try:
        fetch(dispatch(np.zeros((padding.size, size, size, 3), np.uint8)))
    except Exception as exc:  # torch._dynamo and Inductor raise many kinds of error
        log.warning("torch.compile could not compile %s (%s: %s); running it eagerly, which is slower",
                    model.name, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        run[0] = both_views
    return Forward(dispatch, fetch)

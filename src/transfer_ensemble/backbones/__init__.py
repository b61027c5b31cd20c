"""Registry of backbones used as frozen, pooled feature extractors, whatever builds them.

A backbone is data (``BackboneSpec``): its builder, native input size and the multiple a size
must be, pooled width, preprocessing and weights. A builder is a module with ``resolve_weights``,
``bind``, ``settings``, ``offline_message`` and ``build`` and a ``TABLE`` of specs; adding one is a
new file here and one line in ``BUILDERS``. Frameworks are imported only when a backbone is built.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from transfer_ensemble import backend, plugins
from transfer_ensemble.backbones import hub, keras_apps
from transfer_ensemble.backbones.spec import BackboneSpec, Preprocessing, WeightsSource, file_sha256
from transfer_ensemble.backbones.keras_apps import keras_cache_dir
from transfer_ensemble.errors import UserError

__all__ = ["BackboneSpec", "Preprocessing", "WeightsSource", "file_sha256", "keras_cache_dir", "REGISTRY",
           "DEFAULT_BACKBONES", "get_spec", "parse_backbones", "resolve_weights", "resolve_all", "go_on_without",
           "bind", "settings", "build", "needs_download", "offline_message", "random_backend", "with_mid_layer",
           "WeightsUnavailableError", "preprocess_input", "preprocess_fn", "register", "unregister"]

BUILDERS = {keras_apps.BUILDER: keras_apps, hub.BUILDER: hub}

REGISTRY: dict[str, BackboneSpec] = {name: spec for module in BUILDERS.values() for name, spec in module.TABLE.items()}

DEFAULT_BACKBONES = ("xception", "inception_v3")
BUILT_IN = frozenset(REGISTRY)


def register(spec: BackboneSpec, module: str | None = None) -> BackboneSpec:
    """Add a backbone built by one of `BUILDERS` (its name must be new); `module` (default: the
    caller's) is recorded in the runs that use it."""
    if spec.builder not in BUILDERS:
        raise ValueError(f"backbone {spec.name!r}: builder {spec.builder!r} is not one of {', '.join(BUILDERS)}")
    plugins.add("backbone", REGISTRY, spec.name, spec, module)
    return spec


def unregister(name: str) -> None:
    plugins.remove("backbone", REGISTRY, name, BUILT_IN)


def get_spec(name: str) -> BackboneSpec:
    key = plugins.as_name(name)
    if key not in REGISTRY:
        raise UserError(f"Unknown backbone {name!r}. --backbones takes a comma-separated list of: "
                        f"{', '.join(REGISTRY)} (`transfer-ensemble backbones` lists them with their "
                        f"width and native size).")
    return REGISTRY[key]


def parse_backbones(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = text.split(",") if isinstance(text, str) else list(text)
    specs = [get_spec(n).name for n in names if n.strip()]
    if not specs:
        raise UserError("--backbones is empty: name at least one, e.g. --backbones xception,inception_v3.")
    if len(set(specs)) != len(specs):
        raise UserError(f"--backbones names a backbone twice ({','.join(specs)}); name each once.")
    return tuple(specs)


def listing() -> str:
    """The registry as a table: name, builder, pooled width, native size, size multiple, pooling,
    middle layer (with its width)."""
    rows = [("backbone", "builder", "width", "native px", "multiple", "pooling", "mid layer")]
    rows += [(s.name, s.builder, str(s.width), str(s.size), str(s.size_multiple), s.pooling,
              f"{s.mid_layer} ({s.mid_width})" if s.mid_layer else "-") for s in REGISTRY.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    return (f"{table}\n\nwidth: pooled features per image; a size (--image-size times each --scales entry) is "
            f"rounded to the nearest multiple (a ViT's patch size); mid layer: average-pooled beside the final "
            f"features with --mid-layer (the default). keras_hub backbones need the [hub] extra and --weights "
            f"imagenet (downloaded), random or a folder of saved presets.")


def resolve_weights(spec: BackboneSpec, weights: str, seed: int = 0) -> WeightsSource:
    """Where `weights` ('imagenet', 'random' or a folder) puts this backbone's weights.

    Random weights depend on the Keras backend that draws them, so another backend than
    TensorFlow is part of their identity (TensorFlow's is left out: stores written before
    keep theirs).
    """
    source = BUILDERS[spec.builder].resolve_weights(spec, weights, seed)
    if source.kind == "random" and backend.name() != "tensorflow":
        return WeightsSource(source.kind, source.path, f"{source.identity}:backend={backend.name()}")
    return source


def resolve_all(specs: list[BackboneSpec], weights: str, seed: int = 0) -> dict[str, WeightsSource]:
    """``resolve_weights`` of each backbone. Where only some have their weights, one error names
    every missing file and how to go on with the backbones that have theirs."""
    sources, missing = {}, []
    for spec in specs:
        try:
            sources[spec.name] = resolve_weights(spec, weights, seed)
        except UserError as exc:
            missing.append(exc)
    if missing and not sources:
        raise missing[0]
    if missing:
        raise UserError(" ".join(map(str, missing)) + go_on_without(len(missing), list(sources)))
    return sources


def go_on_without(missing: int, present: list[str]) -> str:
    """The sentence that ends an error about `missing` backbones' weights: how to go on with the
    `present` ones ("" when there are none)."""
    if not present:
        return ""
    return (f" Or go on without {'them' if missing > 1 else 'it'}, with the backbones whose weights are "
            f"there: --backbones {','.join(present)}.")


def random_backend(identity: str) -> str | None:
    """The Keras backend that drew random weights of this identity (``resolve_weights``); None
    for other weights."""
    if not identity.startswith("random:"):
        return None
    return identity.partition(":backend=")[2] or "tensorflow"


def bind(spec: BackboneSpec, source: WeightsSource) -> BackboneSpec:
    """The spec as `source` has it (a saved keras_hub preset knows its own width and size)."""
    return BUILDERS[spec.builder].bind(spec, source)


def settings(spec: BackboneSpec) -> dict:
    """What the builder records in a store's settings besides the weights: its preprocessing
    (and for keras_hub its pooling)."""
    return BUILDERS[spec.builder].settings(spec)


def needs_download(source: WeightsSource) -> bool:
    """Whether these weights are published ones that are not on this machine yet (as far as we know)."""
    return source.kind == "imagenet" and source.path is None


class WeightsUnavailableError(UserError):
    """ImageNet weights are neither cached nor downloadable (typically: no internet)."""


def offline_message(specs: list[BackboneSpec], causes: Mapping[str, BaseException] | None = None) -> str:
    """One paragraph per builder of `specs`: what could not be fetched (with why: the first of
    `causes`, by backbone name, among that builder's backbones) and how to fetch it once."""
    parts = []
    for builder, module in BUILDERS.items():
        mine = [s for s in specs if s.builder == builder]
        if mine:
            cause = next((causes[s.name] for s in mine if s.name in (causes or {})), None)
            parts.append(module.offline_message(mine, cause))
    return " ".join(parts)


def build(spec: BackboneSpec, source: WeightsSource, image_size: int, seed: int = 0, mid: bool = False):
    """The frozen Keras model whose output is the pooled float32 features of `spec`; with `mid`,
    the average-pooled output of its `mid_layer` after them (``spec.width + spec.mid_width`` wide)."""
    model = BUILDERS[spec.builder].build(spec, source, image_size, seed)
    return with_mid_layer(model, spec) if mid else model


def with_mid_layer(model, spec: BackboneSpec):
    """`model` with the global average of its `spec.mid_layer` output appended to its output, in
    the same pass (the final features come first, computed as without it)."""
    import keras

    if not spec.mid_layer:
        raise UserError(f"The backbone {spec.name} declares no middle layer to pool; extract it with "
                        f"--no-mid-layer.")
    mid = keras.layers.GlobalAveragePooling2D(name="mid_pool")(model.get_layer(spec.mid_layer).output)
    out = keras.layers.Concatenate(name="final_and_mid")([model.output, mid])
    wide = keras.Model(model.input, out, name=f"{model.name}_and_mid")
    wide.trainable = False
    return wide


def preprocess_input(spec: BackboneSpec) -> Callable:
    """The backbone's preprocessing of float32 RGB pixels in [0, 255] (array or tensor)."""
    return spec.preprocessing.function()


def preprocess_fn(spec: BackboneSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing on a NumPy batch of RGB pixels in [0, 255], as float32."""
    preprocess = preprocess_input(spec)
    return lambda pixels: np.asarray(preprocess(pixels.astype(np.float32)))

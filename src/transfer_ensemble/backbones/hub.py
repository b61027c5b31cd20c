"""The keras_hub builder: presets of DINOv2, DINOv3, SigLIP / SigLIP 2, CLIP, MetaCLIP 2 and
EfficientNet, frozen, with each family's pooled feature, as a Keras model whose output is float32
features.

A family says which keras_hub class builds it, its published preprocessing and how its output
is pooled: ViTs by their class token (``cls``), the mean of their patch tokens (``mean``) or both
side by side (``cls+mean``, as DINOv2's linear probes); SigLIP by its own attention-pooling head
(``map``); convolutional nets by global average pooling (``avg``). A family also says which Hugging
Face model types and timm architectures keras_hub converts into it (``hub_formats``). A preset entry
gives its native size, patch size, pooled width and the architecture built for ``--weights random``.
keras_hub is imported only when one of these backbones is built; reading a weights folder needs only
json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from transfer_ensemble.backbones import hub_formats
from transfer_ensemble.backbones.hub_formats import KERAS, SNAPSHOTS, TIMM, TRANSFORMERS
from transfer_ensemble.backbones.spec import BackboneSpec, Preprocessing, WeightsSource, file_sha256
from transfer_ensemble.errors import UserError

log = logging.getLogger(__name__)

BUILDER = "keras_hub"
IMAGENET_MEAN_STD = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HALF = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLIP = Preprocessing(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
SATELLITE = Preprocessing(mean=(0.430, 0.411, 0.296), std=(0.213, 0.156, 0.143))  # DINOv3's SAT-493M models


@dataclass(frozen=True)
class Family:
    """A keras_hub model family: the class of its (vision) backbone, the class a full preset
    may hold it in, its published preprocessing and its pooled feature. `post_norm` names the
    full model's layer norm of the pooled token where the tower's output lacks it (MetaCLIP 2:
    a preset must then hold the full model). `model_types` and `timm_prefixes`: the Hugging Face
    model types (the vision part under `vision_config`) and timm architectures keras_hub converts
    into this family."""

    cls: str
    preprocessing: Preprocessing
    pooling: str
    full_cls: str = ""
    post_norm: str = ""
    model_types: tuple[str, ...] = ()
    vision_config: str = ""
    timm_prefixes: tuple[str, ...] = ()


FAMILIES = {
    "dinov2": Family("DINOV2Backbone", IMAGENET_MEAN_STD, "cls+mean",
                     model_types=("dinov2", "dinov2_with_registers")),
    "dinov3": Family("DINOV3Backbone", IMAGENET_MEAN_STD, "cls+mean", model_types=("dinov3_vit",)),
    "siglip": Family("SigLIPVisionEncoder", HALF, "map", full_cls="SigLIPBackbone"),
    "clip": Family("CLIPVisionEncoder", CLIP, "cls", full_cls="CLIPBackbone"),
    "metaclip_2": Family("MetaCLIP2VisionEncoder", CLIP, "cls", full_cls="MetaCLIP2Backbone",
                         post_norm="vision_post_layer_norm", model_types=("metaclip_2",),
                         vision_config="vision_config"),
    "efficientnet": Family("EfficientNetBackbone", IMAGENET_MEAN_STD, "avg", timm_prefixes=("efficientnet",)),
}


def _pooled_width(family: str, hidden: int) -> int:
    return 2 * hidden if FAMILIES[family].pooling == "cls+mean" else hidden


def _vit(name: str, family: str, size: int, patch: int, hidden: int, layers: int, heads: int,
         intermediate: int, preprocessing: Preprocessing | None = None, **extra) -> BackboneSpec:
    arch = dict(patch_size=patch, num_layers=layers, hidden_dim=hidden, num_heads=heads,
                intermediate_dim=intermediate, image_shape=(size, size, 3), **extra)
    return BackboneSpec(name, BUILDER, size, _pooled_width(family, hidden),
                        preprocessing or FAMILIES[family].preprocessing, min_size=patch, size_multiple=patch,
                        family=family, pooling=FAMILIES[family].pooling, arch=arch)


def _dinov2(name: str, hidden: int, layers: int, heads: int, registers: int = 0) -> BackboneSpec:
    return _vit(name, "dinov2", 224, 14, hidden, layers, heads, 4 * hidden, num_register_tokens=registers,
                position_embedding_shape=(518, 518, 3))


def _dinov3(name: str, hidden: int, layers: int, heads: int, intermediate: int, gated: bool = False,
            satellite: bool = False) -> BackboneSpec:
    """A DINOv3 ViT/16 as its Hugging Face config has it: 4 registers, a SwiGLU MLP (SiLU) for S+, H+ and 7B."""
    return _vit(name, "dinov3", 224, 16, hidden, layers, heads, intermediate,
                preprocessing=SATELLITE if satellite else None, num_register_tokens=4, use_gated_mlp=gated,
                hidden_activation="silu" if gated else "gelu")


def _metaclip_2(name: str, size: int, hidden: int, layers: int, intermediate: int, activation: str) -> BackboneSpec:
    """A MetaCLIP 2 worldwide vision tower (patch 14, 16 heads) as in its open_clip model config."""
    return _vit(name, "metaclip_2", size, 14, hidden, layers, 16, intermediate, intermediate_activation=activation)


_B0 = dict(stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3], stackwise_num_repeats=[1, 2, 2, 3, 3, 4, 1],
           stackwise_input_filters=[32, 16, 24, 40, 80, 112, 192],
           stackwise_output_filters=[16, 24, 40, 80, 112, 192, 320],
           stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6], stackwise_squeeze_and_excite_ratios=[0.25] * 7,
           stackwise_strides=[1, 2, 2, 2, 1, 2, 1], stackwise_block_types=["v1"] * 7, min_depth=None,
           include_stem_padding=True, use_depth_divisor_as_min_depth=True, cap_round_filter_decrease=True,
           stem_conv_padding="valid", num_features=1280)


def _efficientnet(name: str, size: int, width: int, width_coefficient: float, depth_coefficient: float) -> BackboneSpec:
    arch = dict(_B0, width_coefficient=width_coefficient, depth_coefficient=depth_coefficient)
    return BackboneSpec(name, BUILDER, size, width, IMAGENET_MEAN_STD, min_size=32, family="efficientnet",
                        pooling="avg", arch=arch)


TABLE: dict[str, BackboneSpec] = {s.name: s for s in [
    _dinov2("dinov2_small", 384, 12, 6),
    _dinov2("dinov2_base", 768, 12, 12),
    _dinov2("dinov2_large", 1024, 24, 16),
    _dinov2("dinov2_with_registers_small", 384, 12, 6, registers=4),
    _dinov2("dinov2_with_registers_base", 768, 12, 12, registers=4),
    _dinov2("dinov2_with_registers_large", 1024, 24, 16, registers=4),
    _dinov3("dinov3_vit_small_lvd1689m", 384, 12, 6, 1536),
    _dinov3("dinov3_vit_small_plus_lvd1689m", 384, 12, 6, 1536, gated=True),
    _dinov3("dinov3_vit_base_lvd1689m", 768, 12, 12, 3072),
    _dinov3("dinov3_vit_large_lvd1689m", 1024, 24, 16, 4096),
    _dinov3("dinov3_vit_huge_plus_lvd1689m", 1280, 32, 20, 5120, gated=True),
    _dinov3("dinov3_vit_7b_lvd1689m", 4096, 40, 32, 8192, gated=True),
    _dinov3("dinov3_vit_large_sat493m", 1024, 24, 16, 4096, satellite=True),
    _dinov3("dinov3_vit_7b_sat493m", 4096, 40, 32, 8192, gated=True, satellite=True),
    _vit("siglip2_base_patch16_224", "siglip", 224, 16, 768, 12, 12, 3072),
    _vit("siglip2_so400m_patch14_224", "siglip", 224, 14, 1152, 27, 16, 4304),
    _vit("siglip2_so400m_patch14_384", "siglip", 384, 14, 1152, 27, 16, 4304),
    _vit("siglip_so400m_patch14_384", "siglip", 384, 14, 1152, 27, 16, 4304),
    _vit("clip_vit_base_patch16", "clip", 224, 16, 768, 12, 12, 3072),
    _vit("clip_vit_large_patch14", "clip", 224, 14, 1024, 24, 16, 4096),
    _vit("clip_vit_large_patch14_336", "clip", 336, 14, 1024, 24, 16, 4096),
    _metaclip_2("metaclip_2_vit_huge_patch14_224", 224, 1280, 32, 5120, "quick_gelu"),
    _metaclip_2("metaclip_2_vit_huge_patch14_378", 378, 1280, 32, 5120, "gelu"),
    _metaclip_2("metaclip_2_vit_giant_patch14_224", 224, 1664, 48, 8192, "gelu"),
    _metaclip_2("metaclip_2_vit_giant_patch14_378", 378, 1664, 48, 8192, "gelu"),
    _efficientnet("efficientnet_b0_ra_imagenet", 224, 1280, 1.0, 1.0),
    _efficientnet("efficientnet_b3_ra2_imagenet", 288, 1536, 1.2, 1.4),
]}

WEIGHT_FILES = ("config.json", "model.weights.h5")


def fetch_command(name: str, folder: str = "WEIGHTS_DIR") -> str:
    return (f"python -c \"import keras_hub; keras_hub.models.Backbone.from_preset('{name}')"
            f".save_to_preset('{folder}/{name}')\"")


def resolve_weights(spec: BackboneSpec, weights: str, seed: int = 0) -> WeightsSource:
    """'random' (the table's architecture), 'imagenet' (the published preset, downloaded by
    keras_hub) or a folder holding FOLDER/<preset name>/ in a format keras_hub reads
    (``hub_formats``): as ``Backbone.save_to_preset`` wrote it, a Hugging Face snapshot or a timm
    folder. A snapshot's identity names its format; a saved preset's is the digest alone, as it
    always was."""
    if weights == "random":
        return WeightsSource("random", None, f"random:seed={seed}")
    if weights == "imagenet":
        return WeightsSource("imagenet", None, f"keras_hub:{spec.name}")
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise UserError(f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing folder. "
                        f"For {spec.name}, pass a folder holding {spec.name}/ as keras_hub's "
                        f"save_to_preset writes it: {fetch_command(spec.name)}")
    preset = folder / spec.name
    fetch = fetch_command(spec.name, str(folder))
    if not (preset / "config.json").is_file():
        raise UserError(
            f"The weights folder {folder} has no keras_hub preset {spec.name}: {preset} lacks config.json (the "
            f"folder holds {hub_formats.contents(folder)}). {hub_formats.what_works(spec.name, fetch)} Write it "
            f"once on a machine with internet and copy it here.")
    fmt, files = hub_formats.check(spec, preset, FAMILIES[spec.family], fetch)
    if fmt != KERAS:
        return WeightsSource("file", preset, hub_formats.identity(fmt, files), fmt)
    _check_weights_file(spec, preset / "model.weights.h5")
    identity = hashlib.sha256("".join(file_sha256(preset / name) for name in WEIGHT_FILES).encode()).hexdigest()
    return WeightsSource("file", preset, f"sha256:{identity}", KERAS)


def _check_weights_file(spec: BackboneSpec, path: Path) -> None:
    """Refuse a weights file that is not a whole HDF5 file (HDF5 checks its recorded end at opening)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            f.visit(lambda name: None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path} is not a readable weights file ({exc}): it is damaged or cut short, e.g. by "
                        f"an interrupted copy. Copy the preset folder again from where it was saved, or write "
                        f"it again with {fetch_command(spec.name, str(path.parent.parent))}.") from None


def _reason(exc: BaseException) -> str:
    """Why a preset's JSON file could not be read, in words."""
    if isinstance(exc, KeyError):
        return f"it has no {exc.args[0]!r} entry"
    if isinstance(exc, json.JSONDecodeError):
        return f"it is not JSON: {exc}"
    return str(exc)


def _read_config(spec: BackboneSpec, source: WeightsSource) -> dict:
    """The (vision) backbone's config in a weights folder (a snapshot's in keras_hub's names),
    checked against the family's class."""
    family, preset = FAMILIES[spec.family], source.path
    if source.format in SNAPSHOTS:
        return hub_formats.keras_config(source.format, hub_formats.read_config(preset / "config.json"), family)
    try:
        saved = json.loads((preset / "config.json").read_text())
        kind, config = saved["class_name"], saved["config"]
        if kind == family.full_cls:
            kind, config = config["vision_encoder"]["class_name"], config["vision_encoder"]["config"]
        if not isinstance(config, dict):
            raise ValueError(f"its config is {type(config).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{preset / 'config.json'} is not a keras_hub preset config ({_reason(exc)}). Write the "
                        f"folder again with {fetch_command(spec.name)}.") from None
    if kind != family.cls:
        raise UserError(f"{preset} holds a {kind}, not the {family.cls} that {spec.name} is. Save "
                        f"{spec.name} there with {fetch_command(spec.name)}.")
    if family.post_norm and saved["class_name"] != family.full_cls:
        raise UserError(f"{preset} holds a {kind} alone, without the {family.full_cls}'s {family.post_norm} that "
                        f"{spec.name}'s pooled feature ends with. Save the whole {family.full_cls} there with "
                        f"{fetch_command(spec.name)}.")
    return config


def _preprocessing(spec: BackboneSpec, source: WeightsSource) -> Preprocessing:
    """The folder's own normalisation where it states one (a saved image converter, x * scale +
    offset; a snapshot's preprocessor config), else the published one."""
    if source.format in SNAPSHOTS:
        config = hub_formats.read_config(source.path / "config.json")
        return hub_formats.preprocessing(source.format, source.path, config, spec.preprocessing)
    path = source.path / "image_converter.json"
    if not path.is_file():
        return spec.preprocessing
    try:
        config = json.loads(path.read_text())["config"]
        scale, offset = _per_channel(config.get("scale"), 1.0), _per_channel(config.get("offset"), 0.0)
        if 0 in scale:
            raise ValueError(f"its scale {config.get('scale')!r} has a zero")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a keras_hub image converter config ({_reason(exc)}). Delete it to use "
                        f"{spec.name}'s published preprocessing, or write the folder again with "
                        f"{fetch_command(spec.name)}.") from None
    std = tuple(float(1 / 255 / s) for s in scale)
    return Preprocessing(mean=tuple(float(-o * d) for o, d in zip(offset, std)), std=std)


def _per_channel(value, default: float) -> list[float]:
    """An image converter's scale or offset (absent, one number or one per channel) as 3 numbers."""
    if value is None or value == []:
        return [default] * 3
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in values):
        raise ValueError(f"{value!r} is neither a number nor 3 numbers")
    return [float(v) for v in values]


def bind(spec: BackboneSpec, source: WeightsSource) -> BackboneSpec:
    """The spec as a weights folder has it: its width, native size, patch size, preprocessing and,
    where it is not the published one, its architecture (``_architecture``). A snapshot runs at the
    entry's native size (a Hugging Face config's image_size is the size of DINOv2's position table,
    518, not the size it is used at)."""
    if source.kind != "file":
        return spec
    config = _read_config(spec, source)
    path = source.path / "config.json"
    shape = [None] if source.format in SNAPSHOTS else config.get("image_shape") or config.get("input_shape") or [None]
    if not isinstance(shape, list) or not shape or not (shape[0] is None or _is_whole(shape[0])):
        raise _bad_field(spec, path, "image_shape" if "image_shape" in config else "input_shape", shape)
    size = shape[0] or spec.size
    if spec.family == "efficientnet":
        width = _whole(spec, config, "num_features", path) if source.format == TIMM else \
            _efficientnet_width(spec, config, path)
        patch = 1
    else:
        width, patch = _pooled_width(spec.family, _whole(spec, config, "hidden_dim", path)), \
            _whole(spec, config, "patch_size", path)
    return replace(spec, size=int(size), width=width, size_multiple=patch,
                   min_size=patch if patch > 1 else spec.min_size, preprocessing=_preprocessing(spec, source),
                   arch=_architecture(spec, config, width, source.path))


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _whole(spec: BackboneSpec, config: dict, key: str, path: Path) -> int:
    """A positive whole number of a preset's config."""
    if not _is_whole(config.get(key)):
        raise _bad_field(spec, path, key, config.get(key), missing=key not in config)
    return config[key]


def _bad_field(spec: BackboneSpec, path: Path, key: str, value, missing: bool = False) -> UserError:
    what = f"has no {key}" if missing else f"gives {key} as {value!r}, not a positive whole number"
    return UserError(f"{path} {what}: it is not a {FAMILIES[spec.family].cls} config as keras_hub writes it. "
                     f"Write the folder again with {fetch_command(spec.name)}.")


def _efficientnet_width(spec: BackboneSpec, config: dict, path: Path) -> int:
    from keras_hub.src.models.efficientnet.efficientnet_backbone import round_filters

    try:
        coefficients = config.get("stackwise_width_coefficients") or [config.get("width_coefficient", 1.0)]
        return int(round_filters(filters=config.get("num_features", 1280), width_coefficient=coefficients[-1],
                                 min_depth=config.get("min_depth", 8), depth_divisor=config.get("depth_divisor", 8),
                                 use_depth_divisor_as_min_depth=config.get("use_depth_divisor_as_min_depth", False),
                                 cap_round_filter_decrease=config.get("cap_round_filter_decrease", False)))
    except (TypeError, ValueError, IndexError) as exc:
        raise UserError(f"{path} is not an EfficientNetBackbone config as keras_hub writes it ({exc}). Write "
                        f"the folder again with {fetch_command(spec.name)}.") from None


ARCH_KEYS = ("hidden_dim", "num_layers", "num_heads", "intermediate_dim", "patch_size", "num_register_tokens",
             "use_gated_mlp")


def _published(spec: BackboneSpec) -> dict:
    """What tells a registry entry's architecture from its family's others: a ViT's dimensions, an
    EfficientNet's pooled width."""
    if spec.family == "efficientnet":
        return {"width": spec.width}
    return {k: spec.arch[k] for k in ARCH_KEYS if k in spec.arch}


def _architecture(spec: BackboneSpec, config: dict, width: int, preset: Path) -> dict:
    """The table's architecture where the preset has it. A preset that is another entry of the
    table (dinov2_small saved as dinov2_large) is refused; one that is none of them (a fine-tuned
    variant, a test's tiny one) is used with a warning, and its own architecture is returned,
    which its store settings record (``settings``)."""
    published = _published(spec)
    own = {"width": width} if spec.family == "efficientnet" else {k: config.get(k) for k in published}
    if own == published:
        return spec.arch
    other = next((s for s in TABLE.values() if s.family == spec.family and s.name != spec.name
                  and _published(s) == own), None)
    if other is not None:
        raise UserError(f"{preset} holds {other.name} ({_describe(own)}), not {spec.name} ({_describe(published)}): "
                        f"its features would be recorded under the wrong name. Move it to "
                        f"{preset.parent / other.name} and pass --backbones {other.name}, or save {spec.name} "
                        f"there with {fetch_command(spec.name, str(preset.parent))}.")
    log.warning("%s is not the published %s: it has %s where %s has %s. Its features are computed as it is "
                "and its store settings record its architecture.", preset, spec.name, _describe(own), spec.name,
                _describe(published))
    return own


def _describe(arch: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in arch.items())


def settings(spec: BackboneSpec) -> dict:
    """The store settings this builder adds: the preprocessing and the pooled feature, and the
    architecture of a preset that is not the published one (``bind``)."""
    out = {"preprocess": spec.preprocessing.record(), "pooling": spec.pooling}
    if spec.name in TABLE and spec.arch != TABLE[spec.name].arch:
        out["architecture"] = dict(spec.arch)
    return out


def offline_message(specs: list[BackboneSpec], cause: BaseException | None = None) -> str:
    names = ", ".join(s.name for s in specs)
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return (f"Could not fetch the keras_hub preset{'s' if len(specs) > 1 else ''} {names}{why}. This "
            f"machine seems to be offline. Fix: on a machine with internet, save each preset once, e.g. "
            f"{fetch_command(specs[0].name)}, copy WEIGHTS_DIR here and pass --weights WEIGHTS_DIR "
            f"(it may hold the keras.applications .h5 files too). For a smoke test without weights use "
            f"--weights random.")


def build(spec: BackboneSpec, source: WeightsSource, image_size: int, seed: int = 0):
    """The frozen backbone at `image_size` with its pooling, as one Keras model of float32 output."""
    import keras
    import keras_hub

    family = FAMILIES[spec.family]
    if source.kind == "random":
        keras.utils.set_random_seed(seed)
        arch = dict(spec.arch)
        if "image_shape" in arch:
            arch["image_shape"] = (image_size, image_size, 3)
        net = getattr(keras_hub.models, family.cls)(**arch)
        post_norm = keras.layers.LayerNormalization(epsilon=1e-5, name=family.post_norm) if family.post_norm else None
    else:
        full = _from_preset(spec, source)
        post_norm = getattr(full, family.post_norm) if family.post_norm else None
        net = _at_size(getattr(full, "vision_encoder", full), image_size)
    net.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="images")
    tokens = net({next(iter(net.input)): inputs} if isinstance(net.input, dict) else inputs)
    if post_norm is not None:  # per token, so the class token's is the one a full model pools
        tokens = post_norm(tokens)
    pooled = _Pool(spec.pooling, getattr(net, "num_register_tokens", 0))(tokens)
    model = keras.Model(inputs, pooled, name=spec.name)
    model.trainable = False
    return model


def _from_preset(spec: BackboneSpec, source: WeightsSource):
    """The preset's backbone: downloaded by keras_hub, or loaded from a saved folder (where a
    failure is the folder's, said in one paragraph)."""
    import keras_hub

    with contextlib.redirect_stdout(sys.stderr):
        if source.path is None:
            return keras_hub.models.Backbone.from_preset(spec.name)
        try:
            return keras_hub.models.Backbone.from_preset(str(source.path))
        except Exception as exc:  # keras_hub raises what the failing layer or file raises
            detail = (str(exc).strip().splitlines() or [""])[0][:300]
            files = "model.safetensors" if source.format in SNAPSHOTS else "model.weights.h5"
            raise UserError(f"keras_hub {keras_hub.__version__} cannot load the {_FORMAT_WORDS[source.format]} "
                            f"{source.path} ({type(exc).__name__}: {detail}). It is damaged, or its config.json "
                            f"and {files} do not belong together. Download it again, or write a preset with "
                            f"{fetch_command(spec.name, str(source.path.parent))}.") from None


_FORMAT_WORDS = {KERAS: "preset", TRANSFORMERS: "Hugging Face snapshot", TIMM: "timm folder", "": "preset"}


def _at_size(net, size: int):
    """`net` rebuilt for `size` x `size` inputs where its input size is fixed: a ViT's position
    embeddings (CLIP, SigLIP; the grid of embeddings is resized bicubically, as DINOv2 does in its
    graph), or a convolutional net saved with a fixed `input_shape` (EfficientNet: same weights)."""
    config = net.get_config()
    key = "image_shape" if "image_shape" in config else "input_shape"
    shape = config.get(key)
    if not shape or shape[0] is None or shape[0] == size:
        return net
    import keras
    import numpy as np

    config = dict(config, **{key: (size, size, 3)})
    resized = type(net).from_config(config)
    for target, value in zip(resized.weights, net.weights):
        value = keras.ops.convert_to_numpy(value)
        if tuple(target.shape) != value.shape:
            if "int" in str(target.dtype):  # position ids: 0, 1, ..., n - 1
                value = np.arange(math.prod(target.shape)).reshape(target.shape)
            else:
                value = _resize_grid(value, tuple(target.shape))
        target.assign(value.astype(keras.backend.standardize_dtype(target.dtype)))
    return resized


def _resize_grid(table, shape):
    """A position-embedding table, (tokens, dim) after any leading axes of 1, with a square grid
    (after an optional class token) resized to `shape`."""
    import keras
    import numpy as np

    flat = table.reshape(-1, table.shape[-1])
    rows = math.prod(shape) // table.shape[-1]
    extra = flat.shape[0] - math.isqrt(flat.shape[0]) ** 2
    side, new_side = math.isqrt(flat.shape[0] - extra), math.isqrt(rows - extra)
    grid = flat[extra:].reshape(1, side, side, -1).astype(np.float32)
    grid = keras.ops.convert_to_numpy(keras.ops.image.resize(grid, (new_side, new_side), interpolation="bicubic"))
    return np.concatenate([flat[:extra], grid.reshape(new_side * new_side, -1)]).reshape(shape).astype(table.dtype)


def _pool_layer():
    import keras

    class Pool(keras.layers.Layer):
        """Pooled float32 features of a backbone's tokens or feature map."""

        def __init__(self, mode: str, registers: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.mode, self.registers = mode, registers

        def call(self, x):
            ops = keras.ops
            x = ops.cast(x, "float32")
            if self.mode == "map":
                return x
            if self.mode == "avg":
                return ops.mean(x, axis=(1, 2))
            cls, patches = x[:, 0], ops.mean(x[:, 1 + self.registers:], axis=1)
            if self.mode == "cls":
                return cls
            if self.mode == "mean":
                return patches
            return ops.concatenate([cls, patches], axis=-1)

    return Pool


def _Pool(mode: str, registers: int):
    return _pool_layer()(mode, registers, dtype="float32")

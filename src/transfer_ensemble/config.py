"""Every option's default, flag, help and validation, shared by the CLI, a run's config.json and Python callers.

Each option is one dataclass field declared with ``options.option`` (flag, help, rule, owner):
argparse's options (cli.py), the override dicts, merging and the checks are derived from those
fields. The head kinds' options live beside each head (heads/seed.py, heads/linear.py) and are
owned by it; where the work runs is the engines' (``engines.EngineConfig``, each engine's options
beside it), not the run's options. The dataclasses check themselves
when built, so a bad value is refused wherever it comes from; ``from_json`` and ``merged`` also
say which file, flag or Python call gave it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from transfer_ensemble import backbones, heads, views
from transfer_ensemble.errors import UserError
from transfer_ensemble.heads import LinearOptions, SeedOptions  # noqa: F401  (their options, for callers)
from transfer_ensemble.options import (
    COMMAND_LINE, Checker, Overrides, PythonOrigin, Rule, Where, boolean, check_values, choice, declared,
    describe as _describe, flags_of, nowhere as _nowhere, option, refuse_unknown, whole,
)

MAX_SEED: int = 2**32 // 1000 - 1  # per-fold seeds are seed*1000 + view*100 + fold and must stay < 2**32
MAX_FOLDS: int = 100
PRECISIONS = ("float32", "bfloat16")
BAD_IMAGE_POLICIES = ("error", "skip")
DEFAULT_HEAD = "linear"
"""The head a TrainConfig has when none is given (the default `train` trains CANDIDATE_HEADS)."""
CANDIDATE_HEADS = ("seed", "linear")
"""What `train` trains when no head is named: the paper's head and the linear head (on blocks it
chooses by OOF), then their blend; the run uses the one with the lowest OOF log loss."""
DEFAULT_SCALES = (1.0, 2.0)
"""The input sizes features are extracted at, as multiples of --image-size (or of each backbone's
native size): of the scale and view sets within 6x the paper's forward-pass pixels, the one with the
lowest out-of-fold log loss on both development sets (docs/views.md)."""
SCALE_RANGE = (0.25, 4.0)
MAX_PIXELS = 178_956_970
"""Default cap on an image's pixels (Pillow's decompression-bomb limit)."""
RECIPE_KEYS = ("blocks", "multiscale", "select_blocks", "pool_views", "tta", "temperature")
VIEWS_GROUP = "scales, views and calibration (defaults depend on --head)"

__all__ = ["COMMAND_LINE", "ExtractConfig", "LinearOptions", "MAX_FOLDS", "MAX_SEED", "Overrides", "PythonOrigin",
           "SeedOptions", "TrainConfig", "merged", "upgrade"]


def head_kinds() -> tuple[str, ...]:
    """The registered head kinds (heads.HEADS is the only list)."""
    return heads.names()


def _seed_rule() -> Rule:
    return whole(0, MAX_SEED, " (each fold's seed is seed*1000 + view*100 + fold, and it must fit in 32 bits)")


def _check_backbones(check: Checker, key: str, value: Any, values: dict) -> tuple[str, ...]:
    """`value` (a comma-separated string or a list of names) as registry names, via parse_backbones."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(n, str) for n in value):
        raise check.fail(key, value, 'must be a comma-separated string or a list of backbone names, '
                                     'e.g. "xception,inception_v3"')
    try:
        return backbones.parse_backbones(value)
    except UserError as exc:
        origin = check.where(key)
        if origin is None:
            raise
        at = origin if origin == COMMAND_LINE or isinstance(origin, PythonOrigin) \
            else f'the "{key}" entry of {origin}'
        raise UserError(f"{exc} (The value {value!r} came from {at}.)") from None


def _check_weights(check: Checker, key: str, value: Any, values: dict) -> str:
    if not isinstance(value, str) or not value.strip():
        raise check.fail(key, value, "must be 'imagenet', 'random' or the path of a folder of Keras .h5 weight files")
    return _absolute_folder(value)


def _absolute_folder(weights: str) -> str:
    """A --weights folder that exists as its absolute path, as --data is recorded, so that the run
    means the same folder from any working directory; 'imagenet', 'random' and a path that is no
    folder (refused when the backbones are resolved) as given."""
    folder = Path(weights).expanduser()
    if weights in ("imagenet", "random") or not folder.is_dir():
        return weights
    return str(folder.resolve())


def _check_image_size(check: Checker, key: str, value: Any, values: dict) -> int:
    check.whole(key, value, None)
    for name in values["backbones"]:
        minimum = backbones.REGISTRY[name].min_size
        if value < minimum:
            raise check.fail(key, value, f"is below {name}'s minimum input size of {minimum} px: use "
                                         f"{check.name(key)} {minimum} or more, or leave it unset for each "
                                         f"backbone's native size")
    return value


def _check_views(check: Checker, key: str, value: Any, values: dict) -> tuple[str, ...]:
    """`value` (comma-separated view names or shorthands, or a list) as registered view names."""
    try:
        return views.parse(value)
    except ValueError as exc:
        raise check.fail(key, value, str(exc)) from None


BLOCK_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.mid)?(@[0-9.]+x)?$")


def _check_blocks(check: Checker, key: str, value: Any, values: dict) -> tuple[str, ...]:
    """`value` (a comma-separated string or a list of store names) as distinct block names; which
    of them the run has is checked when a recipe is made (`blocks.blocks_for`)."""
    if value == "all":
        return ()
    items = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(n, str) and BLOCK_NAME.match(n) for n in items):
        raise check.fail(key, value, 'must be a comma-separated list of feature block names as the recipe table '
                                     'shows them (backbone[.mid][@SCALEx]), e.g. "xception,xception@2x", or all')
    return tuple(sorted(set(items)))


def _check_scales(check: Checker, key: str, value: Any, values: dict) -> tuple[float, ...]:
    """`value` (a comma-separated string or a list of numbers) as distinct scales, 1 first."""
    names, image_size = values["backbones"], values["image_size"]
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise check.fail(key, value, 'must be a comma-separated list of numbers, e.g. "1,1.5"')
    scales = []
    for item in items:
        try:
            scale = float(item.strip()) if isinstance(item, str) else item
        except ValueError:
            scale = None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            raise check.fail(key, value, f"must be numbers from {SCALE_RANGE[0]} to {SCALE_RANGE[1]}, "
                                         f"not {item!r}")
        scales.append(float(scale))
    if 1.0 not in scales or len(set(scales)) != len(scales):
        raise check.fail(key, value, "must hold 1 (the --image-size scale itself) and each scale once")
    labels: dict[str, float] = {}
    for scale in scales:
        other = labels.setdefault(scale_label(scale), scale)
        if other != scale:
            raise check.fail(key, value, f"holds {other:.10g} and {scale:.10g}, which share the feature "
                                   f"store name {scale_label(scale)}x: keep one of them")
    for name in names:
        spec = backbones.REGISTRY[name]
        sizes: dict[int, float] = {}
        for scale in scales:
            size = spec.fit_size(scaled_size(image_size if image_size is not None else spec.size, scale))
            if size < spec.min_size:
                raise check.fail(key, value, f"gives {name} an input of {size} px at scale {scale}, "
                                                  f"below its minimum of {spec.min_size} px")
            other = sizes.setdefault(size, scale)
            if other != scale:
                raise check.fail(key, value, f"gives {name} the same input of {size} px at scales "
                                                  f"{other:.10g} and {scale:.10g}, so both would extract the same "
                                                  f"features: keep one of them, or spread them further apart")
    return tuple([1.0] + sorted(s for s in scales if s != 1.0))


def scale_label(scale: float) -> str:
    """How a scale is written in feature store names (``xception@1.5x``)."""
    return f"{scale:g}"


def scaled_size(size: int, scale: float) -> int:
    return int(round(size * scale))


def _values(cls: type, obj: dict, defaults: dict | None = None) -> dict:
    """Every plain field of `cls`, from `obj` where it has the key, else from `defaults`, else the default."""
    defaults = defaults or {}
    return {f.name: obj[f.name] if f.name in obj else defaults.get(f.name, f.default)
            for f in fields(cls) if f.name != "options"}


def _section(obj: Any, source: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"The options in {source} must be a JSON object of option names and values, "
                        f"not {obj!r} ({_describe(obj)}). Fix or delete that file.")
    return obj


def head_option_owners() -> dict[str, tuple[str, ...]]:
    """Each head option's name and the head kinds that own it (two kinds may share a name, e.g. epochs)."""
    owners: dict[str, list[str]] = {}
    for entry in heads.HEADS.values():
        for name, _, _ in declared(entry.options):
            owners.setdefault(name, []).append(entry.name)
    return {name: tuple(kinds) for name, kinds in owners.items()}


def head_option_flags() -> dict[str, str]:
    """Every head option's flag by name; a name shared by two kinds must have one flag."""
    flags: dict[str, str] = {}
    for entry in heads.HEADS.values():
        for name, flag in flags_of(entry.options).items():
            if flags.setdefault(name, flag) != flag:
                raise ValueError(f"head option {name!r} has two flags: {flags[name]} and {flag}")
    return flags


def _extract_from(obj: dict, where: Where) -> "ExtractConfig":
    return ExtractConfig(**check_values(ExtractConfig, _values(ExtractConfig, obj), where))


def _recipe_defaults(entry: heads.HeadEntry) -> dict[str, bool]:
    """A head's recipe defaults (`HeadEntry.recipe`); select_blocks is False where it says nothing
    (a plug-in head registered before the option existed)."""
    return {"select_blocks": False, **entry.recipe}


def _train_from(obj: dict, where: Where) -> "TrainConfig":
    flags = {**flags_of(TrainConfig), **head_option_flags()}
    check = Checker(where, flags)
    head = check.choice("head", obj.get("head", DEFAULT_HEAD), head_kinds())
    entry = heads.get(head)
    owners = head_option_owners()
    foreign = sorted(k for k in obj if k in owners and head not in owners[k])
    if foreign:
        key = foreign[0]
        kinds = " or ".join(f"--head {kind}" for kind in owners[key])
        raise check.fail(key, obj[key], f"is an option of {kinds}, not of --head {head}: add "
                                        f"--head {owners[key][0]}, or leave {check.name(key)} out")
    options = check_values(entry.options, _values(entry.options, obj), where)
    train = check_values(TrainConfig, _values(TrainConfig, obj, _recipe_defaults(entry)), where)
    return TrainConfig(**train, options=entry.options(**options))


@dataclass(frozen=True)
class ExtractConfig:
    """How features are extracted: which backbones, their weights, input size, batching and precision."""

    backbones: tuple[str, ...] = option(backbones.DEFAULT_BACKBONES, "--backbones",
                                        "comma-separated backbone names, concatenated in this order "
                                        "(default: xception,inception_v3)", Rule("text", _check_backbones))
    weights: str = option("imagenet", "--weights", "imagenet (default; Keras cache or download), random "
                                                   "(tests only), or a folder of Keras .h5 weight files",
                          Rule("text", _check_weights))
    image_size: int | None = option(None, "--image-size", "input size in pixels (default: each backbone's "
                                                          "native size, 299 for both defaults)",
                                    Rule("int", _check_image_size), optional=True)
    batch_size: int = option(32, "--batch-size", "images per forward batch (default 32)", whole(1))
    precision: str = option("float32", "--precision", "backbone precision: float32 (default) or bfloat16",
                            choice(PRECISIONS))
    seed: int = option(0, "--seed", "seed for --weights random (default 0)", _seed_rule())
    on_bad_image: str = option("error", "--on-bad-image", "error (default): list undecodable images and stop; "
                                                          "skip: leave them out", choice(BAD_IMAGE_POLICIES))
    max_pixels: int = option(MAX_PIXELS, "--max-pixels", "refuse images of more pixels than this, as bad images "
                                                         "(default 178956970, Pillow's decompression-bomb limit)",
                             whole(1))
    scales: tuple[float, ...] = option(DEFAULT_SCALES, "--scales",
                                       "input sizes to extract at, as multiples of --image-size (default 1,2: "
                                       "a second scale the linear head uses where the OOF says; 1 alone is "
                                       "the paper's)",
                                       Rule("text", _check_scales))
    views: tuple[str, ...] = option(views.DEFAULT_VIEWS, "--views",
                                    "views of each image to extract, comma-separated names or shorthands (pair, "
                                    "center_pair, five_crop, ten_crop; default original,flipped); see docs/views.md",
                                    Rule("text", _check_views))
    mid_layer: bool = option(True, "--mid-layer", "also store each backbone's average-pooled middle layer "
                                                  "(Xception's and InceptionV3's, from the same pass; default on): "
                                                  "the linear head uses it where the OOF says, the paper's "
                                                  "`seed` head never; see docs/recipes.md", boolean())

    def __post_init__(self) -> None:
        checked = check_values(ExtractConfig, {f.name: getattr(self, f.name) for f in fields(self)}, _nowhere)
        for key in ("backbones", "weights", "scales", "views"):
            object.__setattr__(self, key, checked[key])

    def size_of(self, spec: backbones.BackboneSpec, scale: float = 1.0) -> int:
        """The input size `spec` is run at: --image-size if given, else the backbone's native size,
        times `scale`, rounded to the multiple the backbone needs (a ViT's patch size)."""
        return spec.fit_size(scaled_size(self.image_size if self.image_size is not None else spec.size, scale))

    def mid_of(self, spec: backbones.BackboneSpec) -> bool:
        """Whether `spec`'s middle layer is extracted: --mid-layer, where the backbone declares one."""
        return self.mid_layer and bool(spec.mid_layer)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"backbones": list(self.backbones),
                                                                       "scales": list(self.scales),
                                                                       "views": list(self.views)}

    @classmethod
    def from_json(cls, obj: dict, source: str = "config.json") -> "ExtractConfig":
        """Read and check a config.json "extract" section as today's version writes it (`upgrade`
        reads an older one into that); missing keys take their defaults."""
        return _extract_from(_section(obj, source), lambda key: source)


OLD_EXTRACT_DEFAULTS = {"scales": [1.0], "mid_layer": False, "views": list(views.PAIR)}
"""What a run recorded before each extraction option existed did: one scale (before --scales), no
middle layer (before --mid-layer), the pair (before --views)."""


def upgrade(saved: dict) -> dict:
    """A config.json written by any version, as today's version writes it, so that an old run
    means the same to every command (`extract`, `train`, `predict`, `run --config`): the one
    reader of old records. Options recorded before they existed take what the run did then
    (`OLD_EXTRACT_DEFAULTS`), and a top-level ``on_bad_image`` moves into the extraction."""
    out = dict(saved)
    extract = out.get("extract")
    if isinstance(extract, dict):
        extract = {**OLD_EXTRACT_DEFAULTS, **extract}
        if "on_bad_image" in out and "on_bad_image" not in saved["extract"]:
            extract["on_bad_image"] = out["on_bad_image"]
        out["extract"] = extract
    return out


def _head_help() -> str:
    kinds = "; ".join(f"{entry.name}: {entry.help}" if entry.help else entry.name for entry in heads.HEADS.values())
    return (f"kind of head (default: none named: train {' and '.join(CANDIDATE_HEADS)}, blend them by their "
            f"out-of-fold predictions and use the one of the three with the lowest OOF log loss; {kinds})")


@dataclass(frozen=True)
class TrainConfig:
    """How heads are trained: the cross-validation folds, the seed, the head kind with its options,
    and what it is given (`multiscale`: the features of every scale the run extracted, side by
    side, else the first scale's; `pool_views`: one model per fold trained on every view's rows,
    else one per view; `tta`: each model scores every view; `temperature`: a temperature fitted on
    the out-of-fold predictions calibrates the ensemble). None takes the head kind's default
    (its registry entry's `recipe`)."""

    folds: int = option(5, "--folds", "cross-validation folds (default 5)", whole(2, MAX_FOLDS))
    seed: int = option(0, "--seed", "seed of the folds and of head training (default 0)", _seed_rule())
    head: str = option(DEFAULT_HEAD, "--head", _head_help, choice(head_kinds))
    blocks: tuple[str, ...] = option((), "--blocks", "train on these feature blocks alone, side by side (names "
                                                     "as the recipe table shows them: xception, xception.mid, "
                                                     "xception@2x); all (default): every block the head sees, "
                                                     "or those the OOF chooses; see docs/recipes.md",
                                     Rule("text", _check_blocks), group=VIEWS_GROUP)
    multiscale: bool | None = option(None, "--multiscale", "give the heads the features of every extracted "
                                                           "scale side by side", boolean(), group=VIEWS_GROUP)
    select_blocks: bool | None = option(None, "--select-blocks", "train on the feature blocks (backbone x scale x "
                                                                 "layer) chosen by out-of-fold log loss, not on "
                                                                 "all of them; see docs/recipes.md", boolean(),
                                        group=VIEWS_GROUP)
    pool_views: bool | None = option(None, "--pool-views", "one model per fold trained on the rows of every "
                                                           "view, not one per view", boolean(), group=VIEWS_GROUP)
    tta: bool | None = option(None, "--tta", "each model scores every view of an image and averages "
                                             "(test-time augmentation)", boolean(), group=VIEWS_GROUP)
    temperature: bool | None = option(None, "--temperature", "calibrate the ensemble with a temperature fitted "
                                                             "on out-of-fold predictions", boolean(),
                                      group=VIEWS_GROUP)
    options: Any = None

    def __post_init__(self) -> None:
        check = Checker(_nowhere, flags_of(TrainConfig))
        check.choice("head", self.head, head_kinds())
        entry = heads.get(self.head)
        for key, default in _recipe_defaults(entry).items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        checked = check_values(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)}, _nowhere)
        object.__setattr__(self, "blocks", checked["blocks"])
        if self.blocks:  # named blocks are all the recipe sees: no scale to add, nothing to choose
            object.__setattr__(self, "multiscale", True)
            object.__setattr__(self, "select_blocks", False)
        if self.options is None:
            object.__setattr__(self, "options", entry.options())
        if not isinstance(self.options, entry.options):
            raise UserError(f"The options of --head {self.head} must be a {entry.options.__name__}, "
                            f"not {self.options!r}.")

    def to_json(self) -> dict:
        """A flat dict: folds, seed, head, how views are used, and the head's options."""
        opts = {f.name: getattr(self.options, f.name) for f in fields(self.options)}
        recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in RECIPE_KEYS)
                  if k != "blocks" or v}  # no blocks named: not recorded, as before the option existed
        return {"folds": self.folds, "seed": self.seed, "head": self.head, **recipe, **opts}

    @classmethod
    def from_json(cls, obj: dict, source: str = "config.json") -> "TrainConfig":
        """Read and check a flat config.json "train" section; missing keys take their defaults."""
        return _train_from(_section(obj, source), lambda key: source)


def option_names(cls: type) -> tuple[str, ...]:
    """The keys `merged` accepts for `cls` (a TrainConfig's include every head kind's options)."""
    names = tuple(f.name for f in fields(cls) if f.name != "options")
    return names + tuple(head_option_owners()) if cls is TrainConfig else names


def merged(cls, saved: dict | None, overrides: dict, source: str = "config.json", head_from_saved: bool = True):
    """`cls` from `overrides` (None means not given) over `saved` (from `source`) over defaults.

    `overrides` is an options.Overrides saying where it came from (the command line, or a Python
    call such as ``workflow.train(..., overrides)``); a plain dict is taken as the command line.
    A key that is no option is refused, naming the close match. A refused value is reported as
    coming from there when given, else from `source`. For a TrainConfig, saved options of another
    head kind than the one trained are not used (only the folds and the seed carry over), and with
    `head_from_saved` false the head is the one given, else DEFAULT_HEAD (a bare `train` trains the
    default head with the run's folds and seed).
    """
    origin = getattr(overrides, "origin", COMMAND_LINE)
    refuse_unknown(overrides, option_names(cls), origin)
    given = {k: v for k, v in overrides.items() if v is not None}
    saved = {} if saved is None else _section(saved, source)
    if cls is TrainConfig:
        head = given.get("head", saved.get("head", DEFAULT_HEAD) if head_from_saved else DEFAULT_HEAD)
        if saved.get("head", DEFAULT_HEAD) != head:
            saved = {k: saved[k] for k in ("folds", "seed") if k in saved}
        saved = {**saved, "head": head}
    values = {**saved, **given}

    def where(key: str) -> str:
        return origin if key in given else source

    if cls is ExtractConfig:
        return _extract_from(values, where)
    if cls is TrainConfig:
        return _train_from(values, where)
    raise TypeError(f"merged() builds ExtractConfig or TrainConfig, not {cls!r}")

"""Every option's default and validation, shared by the CLI flags, a run's config.json and Python callers.

The dataclasses check themselves when built, so a bad value is refused wherever it comes from;
``from_json`` and ``merged`` also say which file (or the command line) gave it. Every refusal is
a ``UserError`` naming the option by its CLI flag, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from transfer_ensemble import backbones
from transfer_ensemble.errors import UserError

MAX_SEED: int = 2**32 // 1000 - 1  # per-fold seeds are seed*1000 + view*100 + fold and must stay < 2**32
MAX_FOLDS: int = 100
PRECISIONS = ("float32", "bfloat16")
BAD_IMAGE_POLICIES = ("error", "skip")
HEAD_KINDS = ("seed", "linear")
DEFAULT_HEAD = "linear"
"""The head `train` uses when --head is not given: the recipe with the lowest out-of-fold log loss on
the development sets (``scripts/bench_quality.py``; the README has the table)."""
DEFAULT_SCALES = (1.0, 1.5)
"""The input sizes features are extracted at, as multiples of --image-size (or of each backbone's
native size): the second scale lowered out-of-fold log loss by about 12% on fashion10 (README)."""
SCALE_RANGE = (0.25, 4.0)
ENGINES = ("local", "ray")
MAX_PIXELS = 178_956_970
"""Default cap on an image's pixels (Pillow's decompression-bomb limit)."""

COMMAND_LINE = "the command line"

_FLAGS = {
    "backbones": "--backbones", "weights": "--weights", "image_size": "--image-size",
    "precision": "--precision", "on_bad_image": "--on-bad-image", "folds": "--folds", "seed": "--seed",
    "head": "--head", "epochs": "--epochs", "patience": "--patience", "dropout": "--dropout",
    "learning_rate": "--learning-rate", "max_pixels": "--max-pixels", "pool_views": "--pool-views",
    "tta": "--tta", "temperature": "--temperature", "power": "--power", "scales": "--scales",
    "multiscale": "--multiscale",
    "engine": "--engine", "ray_address": "--ray-address", "actors": "--actors",
    "gpus_per_actor": "--gpus-per-actor", "cpus_per_actor": "--cpus-per-actor",
}
RECIPE_KEYS = ("multiscale", "pool_views", "tta", "temperature")

Where = Callable[[str], "str | None"]


def _nowhere(key: str) -> None:
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a true/false value"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


class _Checker:
    """Builds the one-paragraph errors for one section, with the flag and origin of each key."""

    def __init__(self, where: Where, flags: dict[str, str]):
        self.where = where
        self.flags = flags

    def fail(self, key: str, value: Any, problem: str) -> UserError:
        origin = self.where(key)
        if origin is None:
            at = ""
        elif origin == COMMAND_LINE:
            at = " (given on the command line)"
        else:
            at = f' (the "{key}" entry of {origin})'
        return UserError(f"{self.flags[key]} {value!r}{at} {problem}.")

    def whole(self, key: str, value: Any, low: int | None, high: int | None = None, why: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = ""
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                hint = f": write {value.strip()} without quotes"
            raise self.fail(key, value, f"must be a whole number, not {value!r} ({_describe(value)}){hint}")
        if low is not None and (value < low or (high is not None and value > high)):
            allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise self.fail(key, value, f"is out of range: it must be a whole number {allowed}{why}")
        return value

    def real(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, value, f"must be a number, not {value!r} ({_describe(value)})")
        if not math.isfinite(value):
            raise self.fail(key, value, "must be a finite number, not NaN or infinity")
        return value

    def flag(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, value, f"must be true or false, not {value!r} ({_describe(value)})")
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(key, value, f"is not allowed: it must be one of {', '.join(map(repr, allowed))}")
        return value


def _check_seed(check: _Checker, seed: Any) -> None:
    check.whole("seed", seed, 0, MAX_SEED,
                " (each fold's seed is seed*1000 + view*100 + fold, and it must fit in 32 bits)")


def _backbone_names(value: Any, where: Where) -> tuple[str, ...]:
    """`value` (a comma-separated string or a list of names) as registry names, via parse_backbones."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(n, str) for n in value):
        raise _Checker(where, {**_FLAGS, "batch_size": "--head-batch-size"}).fail(
            "backbones", value, 'must be a comma-separated string or a list of backbone names, '
                                'e.g. "xception,inception_v3"')
    try:
        return backbones.parse_backbones(value)
    except UserError as exc:
        origin = where("backbones")
        if origin is None:
            raise
        at = COMMAND_LINE if origin == COMMAND_LINE else f'the "backbones" entry of {origin}'
        raise UserError(f"{exc} (The value {value!r} came from {at}.)") from None


def _check_extract(v: dict, where: Where) -> dict:
    """Check a complete set of ExtractConfig values; returns them with the backbones normalised."""
    check = _Checker(where, {**_FLAGS, "batch_size": "--batch-size"})
    v = {**v, "backbones": _backbone_names(v["backbones"], where)}
    if not isinstance(v["weights"], str) or not v["weights"].strip():
        raise check.fail("weights", v["weights"],
                         "must be 'imagenet', 'random' or the path of a folder of Keras .h5 weight files")
    if v["image_size"] is not None:
        check.whole("image_size", v["image_size"], None)
        for name in v["backbones"]:
            minimum = backbones.REGISTRY[name].min_size
            if v["image_size"] < minimum:
                raise check.fail("image_size", v["image_size"],
                                 f"is below {name}'s minimum input size of {minimum} px: use "
                                 f"--image-size {minimum} or more, or leave it unset for each "
                                 f"backbone's native size")
    check.whole("batch_size", v["batch_size"], 1)
    check.choice("precision", v["precision"], PRECISIONS)
    _check_seed(check, v["seed"])
    check.choice("on_bad_image", v["on_bad_image"], BAD_IMAGE_POLICIES)
    check.whole("max_pixels", v["max_pixels"], 1)
    v["scales"] = _check_scales(check, v["scales"], v["backbones"], v["image_size"])
    return v


def _check_scales(check: _Checker, value: Any, names: tuple[str, ...], image_size: int | None) -> tuple[float, ...]:
    """`value` (a comma-separated string or a list of numbers) as distinct scales, 1 first."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise check.fail("scales", value, 'must be a comma-separated list of numbers, e.g. "1,1.5"')
    scales = []
    for item in items:
        try:
            scale = float(item.strip()) if isinstance(item, str) else item
        except ValueError:
            scale = None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            raise check.fail("scales", value, f"must be numbers from {SCALE_RANGE[0]} to {SCALE_RANGE[1]}, "
                                              f"not {item!r}")
        scales.append(float(scale))
    if 1.0 not in scales or len(set(scales)) != len(scales):
        raise check.fail("scales", value, "must hold 1 (the --image-size scale itself) and each scale once")
    labels: dict[str, float] = {}
    for scale in scales:
        other = labels.setdefault(scale_label(scale), scale)
        if other != scale:
            raise check.fail("scales", value, f"holds {other:.10g} and {scale:.10g}, which share the feature "
                                              f"store name {scale_label(scale)}x: keep one of them")
    for name in names:
        spec = backbones.REGISTRY[name]
        sizes: dict[int, float] = {}
        for scale in scales:
            size = scaled_size(image_size if image_size is not None else spec.size, scale)
            if size < spec.min_size:
                raise check.fail("scales", value, f"gives {name} an input of {size} px at scale {scale}, "
                                                  f"below its minimum of {spec.min_size} px")
            other = sizes.setdefault(size, scale)
            if other != scale:
                raise check.fail("scales", value, f"gives {name} the same input of {size} px at scales "
                                                  f"{other:.10g} and {scale:.10g}, so both would extract the same "
                                                  f"features: keep one of them, or spread them further apart")
    return tuple([1.0] + sorted(s for s in scales if s != 1.0))


def scale_label(scale: float) -> str:
    """How a scale is written in feature store names (``xception@1.5x``)."""
    return f"{scale:g}"


def scaled_size(size: int, scale: float) -> int:
    return int(round(size * scale))


def _check_head(v: dict, where: Where) -> None:
    check = _Checker(where, {**_FLAGS, "batch_size": "--head-batch-size"})
    check.whole("epochs", v["epochs"], 1)
    check.whole("patience", v["patience"], 1)
    if not 0 <= check.real("dropout", v["dropout"]) < 1:
        raise check.fail("dropout", v["dropout"], "is out of range: it must be at least 0 and below 1 "
                                                  "(the fraction of features dropped)")
    check.whole("batch_size", v["batch_size"], 1)
    if not 0 < check.real("learning_rate", v["learning_rate"]) <= 1:
        raise check.fail("learning_rate", v["learning_rate"],
                         "is out of range: it must be above 0 and at most 1 "
                         "(Adam learning rates are typically 1e-4 to 1e-2)")


def _check_linear(v: dict, where: Where) -> None:
    _Checker(where, _FLAGS).flag("power", v["power"])


def _check_train(v: dict, where: Where) -> None:
    check = _Checker(where, _FLAGS)
    check.whole("folds", v["folds"], 2, MAX_FOLDS)
    _check_seed(check, v["seed"])
    check.choice("head", v["head"], HEAD_KINDS)
    for key in RECIPE_KEYS:
        check.flag(key, v[key])


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


def _extract_from(obj: dict, where: Where) -> "ExtractConfig":
    return ExtractConfig(**_check_extract(_values(ExtractConfig, obj), where))


def _train_from(obj: dict, where: Where) -> "TrainConfig":
    head = obj.get("head", DEFAULT_HEAD)
    _Checker(where, _FLAGS).choice("head", head, HEAD_KINDS)
    kind = HEAD_OPTIONS[head]
    foreign = sorted(k for k in obj if k in _OPTION_OWNER and _OPTION_OWNER[k] != head)
    if foreign:
        key = foreign[0]
        raise _Checker(where, {**_FLAGS, "batch_size": "--head-batch-size"}).fail(
            key, obj[key], f"is an option of --head {_OPTION_OWNER[key]}, not of --head {head}: add "
                           f"--head {_OPTION_OWNER[key]}, or leave {_FLAGS.get(key, key)} out")
    options = _values(kind.cls, obj)
    kind.check(options, where)
    train = _values(TrainConfig, obj, RECIPE_DEFAULTS[head])
    _check_train(train, where)
    return TrainConfig(**train, options=kind.cls(**options))


@dataclass(frozen=True)
class ExtractConfig:
    """How features are extracted: which backbones, their weights, input size, batching and precision."""

    backbones: tuple[str, ...] = backbones.DEFAULT_BACKBONES
    weights: str = "imagenet"
    image_size: int | None = None
    batch_size: int = 32
    precision: str = "float32"
    seed: int = 0
    on_bad_image: str = "error"
    max_pixels: int = MAX_PIXELS
    scales: tuple[float, ...] = DEFAULT_SCALES

    def __post_init__(self) -> None:
        checked = _check_extract({f.name: getattr(self, f.name) for f in fields(self)}, _nowhere)
        object.__setattr__(self, "backbones", checked["backbones"])
        object.__setattr__(self, "scales", checked["scales"])

    def size_of(self, spec: backbones.BackboneSpec, scale: float = 1.0) -> int:
        """The input size `spec` is run at: --image-size if given, else the backbone's native size,
        times `scale`."""
        return scaled_size(self.image_size if self.image_size is not None else spec.size, scale)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"backbones": list(self.backbones),
                                                                       "scales": list(self.scales)}

    @classmethod
    def from_json(cls, obj: dict, source: str = "config.json") -> "ExtractConfig":
        """Read and check a config.json "extract" section; missing keys take their defaults."""
        return _extract_from(_section(obj, source), lambda key: source)


@dataclass(frozen=True)
class SeedOptions:
    """The `seed` head (the paper's): dropout and a dense softmax layer, trained with Adam and early stopping."""

    epochs: int = 50
    patience: int = 5
    dropout: float = 0.5
    batch_size: int = 128
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        _check_head({f.name: getattr(self, f.name) for f in fields(self)}, _nowhere)


@dataclass(frozen=True)
class LinearOptions:
    """The `linear` head: multinomial logistic regression (scikit-learn) on standardised features,
    its L2 regularisation chosen by an inner search on the training rows of each fold."""

    power: bool = True  # signed square root, then L2 normalisation, before standardising

    def __post_init__(self) -> None:
        _check_linear({"power": self.power}, _nowhere)


@dataclass(frozen=True)
class HeadKindOptions:
    cls: type
    check: Callable[[dict, Where], None]


HEAD_OPTIONS = {"seed": HeadKindOptions(SeedOptions, _check_head),
                "linear": HeadKindOptions(LinearOptions, _check_linear)}
_OPTION_OWNER = {f.name: head for head, kind in HEAD_OPTIONS.items() for f in fields(kind.cls)}

RECIPE_DEFAULTS = {
    "seed": {"multiscale": False, "pool_views": False, "tta": False, "temperature": False},
    "linear": {"multiscale": True, "pool_views": True, "tta": True, "temperature": True},
}
"""How each head kind is trained on the views and scored, unless told: the seed's are the paper's
(one model per view, each scoring its own view, no calibration), so --head seed reproduces it."""


@dataclass(frozen=True)
class TrainConfig:
    """How heads are trained: the cross-validation folds, the seed, the head kind with its options,
    and what it is given (`multiscale`: the features of every scale the run extracted, side by
    side, else the first scale's; `pool_views`: one model per fold trained on every view's rows,
    else one per view; `tta`: each model scores every view; `temperature`: a temperature fitted on
    the out-of-fold predictions calibrates the ensemble). None takes the head kind's default."""

    folds: int = 5
    seed: int = 0
    head: str = DEFAULT_HEAD
    multiscale: bool | None = None
    pool_views: bool | None = None
    tta: bool | None = None
    temperature: bool | None = None
    options: Any = None

    def __post_init__(self) -> None:
        _check_train({"folds": self.folds, "seed": self.seed, "head": self.head,
                      **{k: True for k in RECIPE_KEYS}}, _nowhere)
        for key, default in RECIPE_DEFAULTS[self.head].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        _check_train({"folds": self.folds, "seed": self.seed, "head": self.head,
                      **{k: getattr(self, k) for k in RECIPE_KEYS}}, _nowhere)
        cls = HEAD_OPTIONS[self.head].cls
        if self.options is None:
            object.__setattr__(self, "options", cls())
        if not isinstance(self.options, cls):
            raise UserError(f"The options of --head {self.head} must be a {cls.__name__}, not {self.options!r}.")

    def to_json(self) -> dict:
        """A flat dict: folds, seed, head, how views are used, and the head's options."""
        opts = {f.name: getattr(self.options, f.name) for f in fields(self.options)}
        return {"folds": self.folds, "seed": self.seed, "head": self.head,
                **{k: getattr(self, k) for k in RECIPE_KEYS}, **opts}

    @classmethod
    def from_json(cls, obj: dict, source: str = "config.json") -> "TrainConfig":
        """Read and check a flat config.json "train" section; missing keys take their defaults."""
        return _train_from(_section(obj, source), lambda key: source)


def _check_engine(v: dict, where: Where) -> None:
    check = _Checker(where, _FLAGS)
    check.choice("engine", v["engine"], ENGINES)
    if v["engine"] == "local":
        given = [k for k in ("ray_address", "actors", "gpus_per_actor", "cpus_per_actor") if v[k] is not None]
        if given:
            raise check.fail(given[0], v[given[0]], "is a Ray option: add --engine ray, or leave it out")
    if v["ray_address"] is not None and (not isinstance(v["ray_address"], str) or not v["ray_address"].strip()):
        raise check.fail("ray_address", v["ray_address"],
                         "must be a Ray cluster address such as 10.0.0.5:6379 or ray://head:10001")
    if v["actors"] is not None:
        check.whole("actors", v["actors"], 1)
    if v["gpus_per_actor"] is not None and check.real("gpus_per_actor", v["gpus_per_actor"]) < 0:
        raise check.fail("gpus_per_actor", v["gpus_per_actor"],
                         "is out of range: it must be 0 (CPU actors) or more (0.5 puts two actors on a GPU)")
    if v["cpus_per_actor"] is not None and check.real("cpus_per_actor", v["cpus_per_actor"]) <= 0:
        raise check.fail("cpus_per_actor", v["cpus_per_actor"], "is out of range: it must be above 0")


@dataclass(frozen=True)
class EngineConfig:
    """Where features are computed: in this process (local) or by a pool of actors on a Ray cluster.

    Not recorded in a run's config.json: the engine changes where the work runs, not its results.
    `ray_address` None means the RAY_ADDRESS variable, else a local Ray started for the run;
    `actors` None means one per GPU of the cluster (one actor without GPUs); `gpus_per_actor`
    None means 1 when the cluster has GPUs, else 0; `cpus_per_actor` None means 1.
    """

    engine: str = "local"
    ray_address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        _check_engine({f.name: getattr(self, f.name) for f in fields(self)}, _nowhere)

    @classmethod
    def from_flags(cls, values: dict) -> "EngineConfig":
        """From command-line values (None where a flag was not given); refusals name the flag."""
        given = {k: v for k, v in values.items() if v is not None}
        merged_values = {f.name: given.get(f.name, f.default) for f in fields(cls)}
        _check_engine(merged_values, lambda key: COMMAND_LINE)
        return cls(**merged_values)


def engine_config(engine: "str | EngineConfig | None") -> EngineConfig:
    """`engine` as an EngineConfig: None is local, a string is that engine with its defaults."""
    if isinstance(engine, EngineConfig):
        return engine
    return EngineConfig() if engine is None else EngineConfig(engine=engine)


def merged(cls, saved: dict | None, overrides: dict, source: str = "config.json", head_from_saved: bool = True):
    """`cls` from `overrides` (flags; None means not given) over `saved` (from `source`) over defaults.

    A refused value is reported as coming from the command line when a flag gave it, else from `source`.
    For a TrainConfig, saved options of another head kind than the one trained are not used (only
    the folds and the seed carry over), and with `head_from_saved` false the head is the one given,
    else DEFAULT_HEAD (a bare `train` trains the default head with the run's folds and seed).
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    saved = {} if saved is None else _section(saved, source)
    if cls is TrainConfig:
        head = given.get("head", saved.get("head", DEFAULT_HEAD) if head_from_saved else DEFAULT_HEAD)
        if saved.get("head", DEFAULT_HEAD) != head:
            saved = {k: saved[k] for k in ("folds", "seed") if k in saved}
        saved = {**saved, "head": head}
    values = {**saved, **given}

    def where(key: str) -> str:
        return COMMAND_LINE if key in given else source

    if cls is ExtractConfig:
        return _extract_from(values, where)
    if cls is TrainConfig:
        return _train_from(values, where)
    raise TypeError(f"merged() builds ExtractConfig or TrainConfig, not {cls!r}")

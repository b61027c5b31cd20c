"""The views of an image the backbones see: each one an entry here, with its transform as data.

A view is the image as decoded at the backbone's input size (``original``), optionally cropped
(a square of `Crop.fraction` of the side at `Crop.anchor`, resized back to the input size) and
optionally mirrored left to right. The compiled pass (``backend.compile_forward``) applies the
transforms to the uint8 batch in the graph, with `transform` below (keras.ops, so the same code
runs inside TensorFlow's, JAX's and torch's compiled passes); a store keeps one ``<view>.npy``
per view.

Each view has a fixed `seed_offset`: fold seeds are ``seed*1000 + offset*100 + fold``, so the
original (0), flipped (1) and the pooled group (2) seed as they always have, and adding a view
changes no existing seed. To add a view: one `View(...)` line in `_ENTRIES`, with the next
unused offset, or ``views.register(View(...))`` from your own code (a plug-in, see ``plugins``).
A store records each view's transform (`View.record`), so features of a view whose transform
has changed since are computed again.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence

from transfer_ensemble import plugins

ANCHORS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class Crop:
    """A square crop of `fraction` of the input's side at `anchor`, resized back to the input size."""

    fraction: float
    anchor: str = "center"

    def box(self, size: int) -> tuple[int, int, int]:
        """(top, left, side) of the crop in a `size` x `size` image."""
        side = max(1, int(round(self.fraction * size)))
        far = size - side
        top = {"center": far // 2, "top_left": 0, "top_right": 0, "bottom_left": far, "bottom_right": far}[self.anchor]
        left = {"center": far // 2, "top_left": 0, "top_right": far, "bottom_left": 0, "bottom_right": far}[self.anchor]
        return top, left, side


@dataclass(frozen=True)
class View:
    """One view: its name (the store's file name), its transform, and its fold-seed offset."""

    name: str
    seed_offset: int
    mirror: bool = False
    crop: Crop | None = None

    def __post_init__(self) -> None:
        plugins.check_name("view", self.name)
        if self.crop is not None and (not 0 < self.crop.fraction <= 1 or self.crop.anchor not in ANCHORS):
            raise ValueError(f"view {self.name!r}: a crop takes a fraction in (0, 1] and an anchor of "
                             f"{', '.join(ANCHORS)}, not {self.crop!r}")

    def record(self) -> dict:
        """The transform as data, as each store records it for the view (`store.view_transforms`)."""
        return {"mirror": self.mirror,
                "crop": None if self.crop is None else {"fraction": self.crop.fraction, "anchor": self.crop.anchor}}

    @property
    def pixels(self) -> float:
        """Forward-pass pixels of this view relative to the original's (a crop is resized back)."""
        return 1.0


CROP = 0.875
"""The side of the crop views, as a fraction of the input's side."""

POOLED_OFFSET = 2  # the seed offset of a recipe's pooled group (recipes.POOLED)

_ENTRIES = [
    View("original", 0),
    View("flipped", 1, mirror=True),
    View("center", 3, crop=Crop(CROP, "center")),
    View("center_flipped", 4, mirror=True, crop=Crop(CROP, "center")),
]
for _i, _anchor in enumerate(ANCHORS[1:]):
    _ENTRIES.append(View(_anchor, 5 + 2 * _i, crop=Crop(CROP, _anchor)))
    _ENTRIES.append(View(f"{_anchor}_flipped", 6 + 2 * _i, mirror=True, crop=Crop(CROP, _anchor)))

REGISTRY: dict[str, View] = {v.name: v for v in _ENTRIES}
BUILT_IN = frozenset(REGISTRY)
PAIR = ("original", "flipped")
"""The paper's views, in every store: the image and its mirror."""
DEFAULT_VIEWS = PAIR
"""The views `extract` computes when --views is not given (see docs/views.md for the measurements)."""
SETS = {"pair": PAIR, "center_pair": PAIR + ("center", "center_flipped"),
        "five_crop": PAIR + tuple(v.name for v in _ENTRIES[2:] if not v.mirror),
        "ten_crop": tuple(REGISTRY)}
"""Shorthands --views accepts for common view sets."""


def register(view: View, module: str | None = None) -> View:
    """Add a view (its name and seed offset must be new); `module` defaults to the caller's."""
    taken = {v.seed_offset for v in REGISTRY.values()} | {POOLED_OFFSET}
    if view.name not in REGISTRY and (not isinstance(view.seed_offset, int) or view.seed_offset < 0
                                      or view.seed_offset in taken):
        raise ValueError(f"view {view.name!r}: seed_offset {view.seed_offset!r} is taken or not a whole number "
                         f">= 0; use {max(taken) + 1} (each view seeds its fold models with its own offset)")
    plugins.add("view", REGISTRY, view.name, view, module)
    return view


def unregister(name: str) -> None:
    plugins.remove("view", REGISTRY, name, BUILT_IN)


def get(name: str) -> View:
    return REGISTRY[name]


def parse(value: Any) -> tuple[str, ...]:
    """A --views value (comma-separated names or shorthands, or a list) as registry names in
    registry order; it always holds the paper's pair. Names are read as --backbones reads its
    (case and hyphens do not matter). ValueError saying what is wrong otherwise: nothing named,
    an empty item, a name given twice, or one that is not a view (with the close match)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ValueError('must be a comma-separated list of view names, e.g. "original,flipped,center"')
    keys = [plugins.as_name(i) for i in items]
    if not any(keys):
        raise ValueError(f"names no view: name views or shorthands, e.g. {', '.join(SETS)} or "
                         f'"original,flipped,center"')
    if not all(keys):
        raise ValueError("has an empty name between its commas: separate view names with single commas, "
                         'e.g. "original,flipped,center"')
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"names {', '.join(twice)} more than once: name each view once")
    names: set[str] = set(PAIR)
    for key in keys:
        if key in SETS:
            names.update(SETS[key])
        elif key in REGISTRY:
            names.add(key)
        else:
            raise ValueError(f"names {key!r}, which is not a view{_close_match(key)}: the views are "
                             f"{', '.join(REGISTRY)}, and the shorthands {', '.join(SETS)}")
    return tuple(n for n in REGISTRY if n in names)


def _close_match(name: str) -> str:
    close = difflib.get_close_matches(name, [*REGISTRY, *SETS], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def seed_offset(group: str) -> int:
    """The fold-seed offset of a model group: a view's own, or the pooled group's."""
    return POOLED_OFFSET if group == "pooled" else REGISTRY[group].seed_offset


def pixel_cost(views: Sequence[str], scales: Sequence[float]) -> float:
    """Forward-pass pixels of an extraction, relative to the paper's (image + mirror at scale 1)."""
    return sum(REGISTRY[v].pixels for v in views) * sum(s * s for s in scales) / 2


def passes(views: Sequence[str]) -> list[tuple[str, ...]]:
    """`views` in groups that share a crop, in order: one compiled pass per group, so the pair's
    features are the same numbers whatever other views a store holds."""
    groups: dict[Crop | None, list[str]] = {}
    for name in views:
        groups.setdefault(REGISTRY[name].crop, []).append(name)
    return [tuple(g) for g in groups.values()]


def whole_passes(wanted: Sequence[str], missing: Sequence[str]) -> tuple[str, ...]:
    """The views of every pass of `wanted` (`passes`) that computes one of `missing`, whole: a view
    is always computed beside the same views, so its features are the same numbers however its
    rows became due (a resumed extraction, or a view added to a store holding the others of its
    pass); the views a store already holds are not written again."""
    lacking = set(missing)
    return tuple(view for group in passes(wanted) if lacking & set(group) for view in group)


def transform(batch: Any, names: Sequence[str], size: int) -> Any:
    """The float32 views `names` of a uint8 batch (n, size, size, 3), stacked view after view
    ((len(names) * n, size, size, 3)), with keras.ops: the same code in every backend's pass."""
    from keras import ops

    pixels = ops.cast(batch, "float32")
    out = []
    for name in names:
        view = REGISTRY[name]
        x = pixels
        if view.crop is not None:
            top, left, side = view.crop.box(size)
            x = ops.image.resize(x[:, top:top + side, left:left + side, :], (size, size),
                                 interpolation="bilinear", antialias=False)
        if view.mirror:
            x = ops.flip(x, axis=2)
        out.append(x)
    return out[0] if len(out) == 1 else ops.concatenate(out, axis=0)

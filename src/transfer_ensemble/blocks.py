"""What a head recipe sees: the feature blocks it trains on and scores, derived once when it is
trained and recorded with it.

A block is one feature store (a backbone at one scale, its final or its middle layer: a
`Source`) in one view. A recipe's `Blocks` are its sources, side by side in column order, in
each of its views. `blocks_for` derives them from the run's extraction, the head's registry
entry (``HeadEntry.paper_features``: the paper's head keeps to the pair and the final layer)
and the recipe's options (``multiscale``); after that, the recipe's record is the only answer
(``recipes.Recipe.blocks``): extracting more blocks later changes no recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from transfer_ensemble import backbones, heads, views
from transfer_ensemble.config import ExtractConfig, TrainConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.store import MID, source_key, store_names


@dataclass(frozen=True)
class Source:
    """One feature store of a split: a backbone's final (or, with `mid`, middle) layer at one scale."""

    backbone: str
    scale: float = 1.0
    mid: bool = False

    @classmethod
    def parse(cls, key: str) -> "Source":
        """The source a store name (`store.source_key`: ``xception``, ``xception.mid``,
        ``xception@2x``, ``xception.mid@2x``) stands for; ValueError if it names none."""
        name, at, scale = key.partition("@")
        if at and not (scale.endswith("x") and _is_number(scale[:-1])):
            raise ValueError(f"{key!r} is not a feature store name (backbone[.mid][@SCALEx])")
        backbone, mid = (name[:-len(MID)], True) if name.endswith(MID) else (name, False)
        return cls(backbone, float(scale[:-1]) if at else 1.0, mid)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Blocks:
    """A recipe's features: `sources` side by side (store names, in column order) in each of `views`."""

    sources: tuple[str, ...]
    views: tuple[str, ...] = views.PAIR

    def scored_views(self, tta: bool) -> tuple[str, ...]:
        """The views whose features are scored: every one with test-time augmentation, else the original."""
        return self.views if tta else self.views[:1]

    @property
    def scales(self) -> tuple[float, ...]:
        """The scales the sources are at, in order."""
        return tuple(dict.fromkeys(Source.parse(key).scale for key in self.sources))

    def at_scale(self, scale: float) -> list[Source]:
        return [s for s in map(Source.parse, self.sources) if s.scale == scale]

    @property
    def label(self) -> str:
        """What a recipe's name says of its views: nothing for the pair, a shorthand's name (e.g.
        ``center_pair``), or ``views_`` and the views beyond the pair."""
        if self.views == views.PAIR:
            return ""
        for name, members in views.SETS.items():
            if tuple(members) == self.views:
                return name
        return "views_" + "+".join(v for v in self.views if v not in views.PAIR)


def scales_used(extract: ExtractConfig, multiscale: bool) -> tuple[float, ...]:
    """The extracted scales a recipe uses: every one with `multiscale`, else the first."""
    return extract.scales if multiscale else extract.scales[:1]


def blocks_for(extract: ExtractConfig, config: TrainConfig) -> Blocks:
    """The blocks a recipe of `config` trains on in a run extracted with `extract`: every backbone
    at the first scale (each followed by its middle layer's store where the run pooled one and the
    head sees it), then (`multiscale`) at each further scale the same, in the run's views; the
    paper's head (``paper_features``) sees the pair's final-layer features only."""
    paper = heads.get(config.head).paper_features
    chosen_views = views.PAIR if paper else extract.views
    if config.blocks:
        return Blocks(named_blocks(extract, config.blocks), tuple(chosen_views))
    return Blocks(extracted_blocks(extract, scales_used(extract, config.multiscale), mid=not paper),
                  tuple(chosen_views))


def extracted_blocks(extract: ExtractConfig, scales: tuple[float, ...] | None = None,
                     mid: bool = True) -> tuple[str, ...]:
    """The blocks a run extracted with `extract` has at `scales` (default every one), in its column
    order: each backbone, followed by its middle layer's where the run pooled one and `mid`."""
    specs = [backbones.get_spec(name) for name in extract.backbones]
    return tuple(source_key(name, scale) for scale in (extract.scales if scales is None else scales)
                 for spec in specs for name in store_names(spec, extract.mid_of(spec) and mid))


def named_blocks(extract: ExtractConfig, names: tuple[str, ...]) -> tuple[str, ...]:
    """The blocks `names` (--blocks) in the run's column order; UserError naming the run's blocks
    where one is not among them."""
    have = extracted_blocks(extract)
    missing = [name for name in names if name not in have]
    if missing:
        raise UserError(f"--blocks {','.join(names)}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        f"not extracted in this run, which has {', '.join(have)}. Name blocks from that list, or "
                        f"extract them first (`extract --backbones/--scales/--mid-layer` with the run folder).")
    return tuple(name for name in have if name in names)


def from_record(inputs: dict) -> Blocks:
    """A recipe's blocks as its recipe.json records them: the sources its ``features`` identities
    are kept under (in column order), and its ``views`` (none recorded: the pair)."""
    return Blocks(tuple(inputs.get("features") or ()), tuple(inputs.get("views") or views.PAIR))


def views_record(blocks: Blocks) -> dict:
    """The ``views`` entry of a recipe's inputs: none for the pair, so that recipes from before
    views were recorded keep their identity."""
    return {} if blocks.views == views.PAIR else {"views": list(blocks.views)}


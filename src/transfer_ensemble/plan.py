"""What an extraction will cost on this machine, said before it starts, and which passes fit in a
time limit.

A pass is one scale's forward passes over the images still to compute (train and test). Its cost
is measured, not guessed: `measure` times the first scale's forward pass on a batch of the run's
own images (after a warm-up call), and a pass at another scale is estimated from it by its pixels
(the backbones' compute grows with the pixels: a 598 px pass of Xception took 4.0x the 299 px one
here). `Plan.describe` is the line `extract` logs before it starts; `progress.job` gives each
pass's progress bar the ETA of the whole extraction.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from transfer_ensemble.errors import UserError

PROBE_IMAGES = 8
"""Images the first scale's forward pass is timed on (after one warm-up call on them)."""
TIMED_CALLS = 2
"""Timed calls on them; the fastest counts (the first calls after a build ran up to 1.4x slower here)."""
TRAIN_SHARE = 0.4
"""Before any head is trained, `train` is budgeted at this share of the first pass's time: the
default `train` (both candidate heads, the block selection and the blend) took 0.27x the 299 px
pass on woof10 on the idle 2-core CPU (84 s against 313 s); after a `train`, its measured time is
used."""
MARGIN_SECONDS = 20.0
"""Kept free at the end of a time limit for writing the submission and the report."""
FIRST_SHARES = (1.0, 0.75, 0.5)
"""With --time-limit, the first pass runs at the first of these shares of the input size that fits."""


@dataclass(frozen=True)
class Pass:
    """One scale's extraction: the images it computes and its estimated seconds on this machine."""

    scale: float
    images: int
    seconds: float

    def describe(self) -> str:
        return f"{_scale(self.scale)} {self.images} images ~{duration_text(self.seconds)}"


@dataclass(frozen=True)
class Speed:
    """The forward pass's speed measured on this machine: `rate` images/s at `scale`."""

    rate: float
    scale: float = 1.0

    def seconds(self, scale: float, images: int) -> float:
        """Seconds to compute `images` at `scale`, by pixels."""
        return images / self.rate * (scale / self.scale) ** 2 if images else 0.0

    def at(self, scale: float) -> "Speed":
        """The speed expected at `scale` (by pixels)."""
        return Speed(self.rate * (self.scale / scale) ** 2, scale)


@dataclass(frozen=True)
class Plan:
    """The passes an extraction will run, with the forward-pass speed they were estimated from."""

    passes: tuple[Pass, ...]
    speed: Speed

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.passes)

    def describe(self) -> str:
        """The line said before extracting: each pass, the total, and what it was measured from."""
        todo = [p for p in self.passes if p.images]
        if not todo:
            return "plan: every feature is already computed"
        return (f"plan: {len(todo)} pass{'es' if len(todo) > 1 else ''} ("
                + ", ".join(p.describe() for p in todo)
                + f"), about {duration_text(self.seconds)} on this machine (measured: {self.speed.rate:.2f} images/s "
                  f"at {_scale(self.speed.scale)}; other scales by their pixels)")


def _scale(scale: float) -> str:
    return f"{scale:g}x"


def duration_text(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(text: str, flag: str = "--time-limit") -> float:
    """Seconds of a duration such as ``15m``, ``90s``, ``1h``, ``1h30m`` or a plain number of
    minutes; UserError naming `flag` otherwise."""
    text = str(text).strip().lower()
    try:
        value = float(text) * 60
    except ValueError:
        found = DURATION.match(text) if text else None
        if not found or not any(found.groups()):
            raise UserError(f"{flag} {text!r} is not a duration: write it as 15m, 90s, 1h or 1h30m "
                            f"(a plain number is minutes).") from None
        h, m, s = (float(g) if g else 0.0 for g in found.groups())
        value = h * 3600 + m * 60 + s
    if not value > 0:
        raise UserError(f"{flag} {text!r} must be longer than 0: write it as 15m, 90s, 1h or 1h30m.")
    return value


def measure(extractor, paths: Sequence[Path], specs: Sequence | None = None) -> Speed:
    """The speed (images per second at its scale) of `extractor`'s forward passes (each backbone of `specs`, default every
    one, every view) on up to PROBE_IMAGES of `paths`, after a warm-up call on the same batch. The
    models it builds are the ones the extraction then uses: built as the extraction builds them
    (ImageNet weights that cannot be downloaded are one error, each build is logged), and only
    those of `specs` (backbones whose features are all cached are not built)."""
    from transfer_ensemble import images

    specs = list(extractor.specs if specs is None else specs)
    if not specs:
        return Speed(float("inf"), extractor.scale)
    extractor.ensure_weights_known()
    extractor.prepare(specs)
    sample = list(paths)[:PROBE_IMAGES]
    elapsed = 0.0
    for spec in specs:
        size = extractor.size(spec)
        batch = next(images.iter_batches(sample, np.arange(len(sample)), size, len(sample),
                                         max_pixels=extractor.config.max_pixels))
        extractor.forward(spec, batch.pixels)
        timings = []
        for _ in range(TIMED_CALLS):
            start = time.perf_counter()
            extractor.forward(spec, batch.pixels)
            timings.append(time.perf_counter() - start)
        elapsed += min(timings)
    return Speed(len(sample) / max(elapsed, 1e-9), extractor.scale)


def fits(elapsed: float, limit: float, extract_seconds: float, train_seconds: float) -> bool:
    """Whether a pass of `extract_seconds`, then a train of `train_seconds` and the submission's
    margin, end within `limit` seconds when `elapsed` have gone."""
    return elapsed + extract_seconds + train_seconds + MARGIN_SECONDS <= limit

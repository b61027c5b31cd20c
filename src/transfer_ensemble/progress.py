"""Progress bars for long work: tqdm on stderr with rate and ETA, all switched off by `--quiet`;
inside `job`, each bar also shows the ETA of the whole job, not only its own."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from tqdm import tqdm

_shown = True
_job: tuple[float, float | None] | None = None  # (seconds of the work after this bar, its expected rate)


def show(enabled: bool) -> None:
    """Show (the default) or hide every progress bar made from now on."""
    global _shown
    _shown = enabled


class JobBar(tqdm):
    """A bar that shows, beside its own ETA, the whole job's: its own time left plus the work after
    it (``later`` seconds, estimated at ``expected`` items/s and rescaled by the rate this bar
    measures)."""

    def __init__(self, *args: Any, later: float = 0.0, expected: float | None = None, **kwargs: Any) -> None:
        self.later, self.expected = later, expected
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        done = self.n + (n or 0)
        elapsed = self.format_dict.get("elapsed") or 0.0
        if self.total and done and elapsed > 0:
            rate = done / elapsed
            left = (self.total - done) / rate + self.later * (self.expected / rate if self.expected else 1.0)
            self.set_postfix_str(f"job ETA {self.format_interval(left)}", refresh=False)
        return super().update(n)


@contextlib.contextmanager
def job(later: float, expected: float | None = None) -> Iterator[None]:
    """Bars made inside show the whole job's ETA: `later` seconds of work come after them, estimated
    at `expected` items/s (their measured rate rescales it)."""
    global _job
    previous, _job = _job, (later, expected)
    try:
        yield
    finally:
        _job = previous


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar sized to the terminal; hidden after `show(False)`; a `JobBar` inside `job`."""
    if _job is not None:
        return JobBar(iterable, dynamic_ncols=True, disable=not _shown, later=_job[0], expected=_job[1], **kwargs)
    return tqdm(iterable, dynamic_ncols=True, disable=not _shown, **kwargs)

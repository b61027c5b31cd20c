"""Progress bars for long work: tqdm on stderr with rate and ETA, all switched off by `--quiet`."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

_shown = True


def show(enabled: bool) -> None:
    """Show (the default) or hide every progress bar made from now on."""
    global _shown
    _shown = enabled


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar sized to the terminal; hidden after `show(False)`."""
    return tqdm(iterable, dynamic_ncols=True, disable=not _shown, **kwargs)

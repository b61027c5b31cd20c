"""Where the work runs: the registry of engines, each behind one protocol.

An engine extracts a split's backbone features into the run's feature stores and scores rows
of stored features with a recipe's models (``scoring.Scorer``); every engine writes the same
stores and gives the same probabilities, so the choice changes where the work runs, never its
results. ``ENGINES`` is the only list of engine names (``--engine`` accepts these): each maps to
the class that implements it, imported only when that engine is used, so Ray is imported only
under ``--engine ray``. Adding an engine is one new module here with a class like
``local.LocalEngine``, and one line below (or, from outside the package, `register`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from transfer_ensemble import plugins

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from transfer_ensemble.config import EngineConfig
    from transfer_ensemble.features import Extractor
    from transfer_ensemble.store import StoreFiles
    from transfer_ensemble.scoring import Scorer

ENGINES: dict[str, str] = {
    "local": "transfer_ensemble.engines.local:LocalEngine",
    "ray": "transfer_ensemble.engines.ray:RayEngine",
}
"""Each engine's name and where its class is ("module:Class")."""


def names() -> tuple[str, ...]:
    """The engines --engine accepts, read when an option is checked (so a registered one counts)."""
    return tuple(ENGINES)


BUILT_IN = frozenset(ENGINES)


def register(name: str, target: str, module: str | None = None) -> None:
    """Add an engine: `target` is "module:Class", a class built from an EngineConfig; the name must be
    new. `module` (default: the caller's) is recorded in the runs that use it."""
    plugins.check_name("engine", name)
    if name in ENGINES:
        raise ValueError(f"an engine named {name!r} is already registered")
    ENGINES[name] = target
    plugins.record("engine", name, module or plugins.caller_module(1))


def unregister(name: str) -> None:
    if name in BUILT_IN:
        raise ValueError(f"the engine {name!r} is built in and cannot be unregistered")
    ENGINES.pop(name, None)
    plugins.forget("engine", name)


class Engine(Protocol):
    """What every engine does. It is built from an ``EngineConfig`` (connecting to whatever it runs
    on then, so a bad setting fails before any work)."""

    def extract_split(self, extractor: "Extractor", split: str, paths: "Sequence[Path]", ids: Sequence[str],
                      keys: Sequence[str], store_of: "Callable[[str], StoreFiles]",
                      donors_of: "Callable[[str], Sequence[StoreFiles]]" = lambda name: ()) -> dict:
        """``features.extract_split``'s contract: compute the rows of `paths` the stores lack; its summary."""

    def score(self, scorer: "Scorer", stores: "Sequence[StoreFiles]", n: int, tta: bool,
              chunk: int) -> "Iterator[tuple[int, np.ndarray]]":
        """(first row, probabilities) for consecutive chunks of rows [0, n) of `stores`, in row order."""


def get(config: "EngineConfig") -> Engine:
    """The engine `config` names, ready to use."""
    module, _, name = ENGINES[config.engine].partition(":")
    return getattr(importlib.import_module(module), name)(config)

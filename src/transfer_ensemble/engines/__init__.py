"""Where the work runs: the registry of engines, each behind one protocol, with its options beside it.

An engine extracts a split's backbone features into the run's feature stores and scores rows
of stored features with a recipe's models (``scoring.Scorer``); every engine writes the same
stores and gives the same probabilities, so the choice changes where the work runs, never its
results. ``ENGINES`` is the only list of engines (``--engine`` accepts these): each entry names
the class that implements it, imported only when that engine is used (so Ray is imported only
under ``--engine ray``), and its options dataclass, whose fields become flags (``--actors``).
Adding an engine is one new module here with a class like ``local.LocalEngine`` and one entry
below, or, from your own code, `register` (a plug-in: see docs/plugins.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from transfer_ensemble import plugins
from transfer_ensemble.engines.ray_options import RayOptions
from transfer_ensemble.errors import UserError
from transfer_ensemble.options import COMMAND_LINE, Checker, check_values, choice, declared, flags_of, nowhere, option

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from transfer_ensemble.features import Extractor, ExtractSummary
    from transfer_ensemble.scoring import Scorer
    from transfer_ensemble.store import StoreFiles


@dataclass(frozen=True)
class NoOptions:
    """An engine without options of its own."""


@dataclass(frozen=True)
class EngineEntry:
    """One engine: its ``--engine`` name, where its class is ("module:Class", built from an
    EngineConfig), its options dataclass (each field declared with ``options.option``) and help."""

    name: str
    target: str
    options: type = NoOptions
    help: str = ""

    def __post_init__(self) -> None:
        plugins.check_name("engine", self.name)


ENGINES: dict[str, EngineEntry] = {entry.name: entry for entry in (
    EngineEntry("local", "transfer_ensemble.engines.local:LocalEngine", help="this process (the default)"),
    EngineEntry("ray", "transfer_ensemble.engines.ray:RayEngine", RayOptions,
                "a Ray cluster; needs `pip install 'transfer_ensemble[ray]'`"),
)}
BUILT_IN = frozenset(ENGINES)


def names() -> tuple[str, ...]:
    """The engines --engine accepts, read when an option is checked (so a registered one counts)."""
    return tuple(ENGINES)


def register(name: str, target: str, options: type = NoOptions, help: str = "",
             module: str | None = None) -> EngineEntry:
    """Add an engine: `target` is "module:Class", a class built from an EngineConfig, `options` its
    options dataclass; the name must be new. `module` (default: the caller's) is recorded in the
    runs that use it."""
    entry = EngineEntry(name, target, options, help)
    plugins.add("engine", ENGINES, name, entry, module)
    return entry


def unregister(name: str) -> None:
    plugins.remove("engine", ENGINES, name, BUILT_IN)


def _engine_help() -> str:
    kinds = "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in ENGINES.values())
    return f"where features are computed (default local; {kinds}; or one registered with engines.register)"


def option_owners() -> dict[str, tuple[str, ...]]:
    """Each engine option's name and the engines that take it."""
    owners: dict[str, list[str]] = {}
    for entry in ENGINES.values():
        for name, _, _ in declared(entry.options):
            owners.setdefault(name, []).append(entry.name)
    return {name: tuple(kinds) for name, kinds in owners.items()}


@dataclass(frozen=True)
class EngineConfig:
    """Where features are computed: the engine, and its options (an instance of its entry's
    `options`; None: their defaults). ``EngineConfig.of("ray", actors=2)`` builds both.

    Not recorded in a run's config.json: the engine changes where the work runs, not its results.
    """

    engine: str = option("local", "--engine", _engine_help, choice(names))
    options: Any = None

    def __post_init__(self) -> None:
        Checker(nowhere, {"engine": "--engine"}).choice("engine", self.engine, names())
        entry = ENGINES[self.engine]
        if self.options is None:
            object.__setattr__(self, "options", entry.options())
        if not isinstance(self.options, entry.options):
            raise UserError(f"The options of --engine {self.engine} must be a {entry.options.__name__}, "
                            f"not {self.options!r}.")

    @classmethod
    def of(cls, engine: str = "local", **options: Any) -> "EngineConfig":
        """The engine `engine` with `options` (its options' field names); refusals name the parameter."""
        return cls._build(engine, options, lambda key: None)

    @classmethod
    def from_flags(cls, values: dict) -> "EngineConfig":
        """From command-line values (None where a flag was not given); refusals name the flag."""
        given = {k: v for k, v in values.items() if v is not None}
        return cls._build(given.pop("engine", "local"), given, lambda key: COMMAND_LINE)

    @classmethod
    def _build(cls, engine: str, given: dict, where) -> "EngineConfig":
        flags = {"engine": "--engine", **{k: f for e in ENGINES.values() for k, f in flags_of(e.options).items()}}
        check = Checker(where, flags)
        check.choice("engine", engine, names())
        owners = option_owners()
        for key, value in given.items():
            if key not in owners:
                raise check.fail(key, value, f"is not an engine option (they are: {', '.join(owners) or 'none'})")
            if engine not in owners[key]:
                kinds = " or ".join(f"--engine {kind}" for kind in owners[key])
                raise check.fail(key, value, f"is an option of {kinds}: add --engine {owners[key][0]}, "
                                             f"or leave {check.name(key)} out")
        entry = ENGINES[engine]
        values = {f.name: given.get(f.name, f.default) for f in fields(entry.options)}
        return cls(engine, entry.options(**check_values(entry.options, values, where, flags)))


def engine_config(engine: "str | EngineConfig | None") -> EngineConfig:
    """`engine` as an EngineConfig: None is local, a string is that engine with its defaults."""
    if isinstance(engine, EngineConfig):
        return engine
    return EngineConfig() if engine is None else EngineConfig(engine=engine)


class Engine(Protocol):
    """What every engine does. It is built from an ``EngineConfig`` (connecting to whatever it runs
    on then, so a bad setting fails before any work)."""

    def extract_split(self, extractor: "Extractor", split: str, paths: "Sequence[Path]", ids: Sequence[str],
                      keys: Sequence[str], store_of: "Callable[[str], StoreFiles]",
                      donors_of: "Callable[[str], Sequence[StoreFiles]]" = lambda name: ()) -> "ExtractSummary":
        """``features.extract_split``'s contract: compute the rows of `paths` the stores lack; its summary."""

    def score(self, scorer: "Scorer", stores: "Sequence[StoreFiles]", n: int, tta: bool,
              chunk: int) -> "Iterator[tuple[int, np.ndarray]]":
        """(first row, probabilities) for consecutive chunks of rows [0, n) of `stores`, in row order."""


def get(config: EngineConfig) -> Engine:
    """The engine `config` names, ready to use."""
    module, _, name = ENGINES[config.engine].target.partition(":")
    return getattr(importlib.import_module(module), name)(config)

"""Plug-ins: heads, views, backbones and engines registered from Python, and where they come from.

Each registry's ``register`` checks the new name (`check_name`: it becomes a file or folder name
in run folders) and notes the module that registered it (`record`). A run records the plug-ins
it used (config.json's and each recipe.json's ``plugins``: kind -> name -> module), so a later
command, in another process, can import them again: the CLI imports the modules named by
``--plugins``, by the ``TRANSFER_ENSEMBLE_PLUGINS`` variable and by the run's own record before
it parses the command (`load`), and a recipe whose plug-in is still missing is refused with
`missing_message`, never replaced by another one.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from transfer_ensemble.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("head", "view", "backbone", "engine")
ENV = "TRANSFER_ENSEMBLE_PLUGINS"
SCRIPT = "__main__"
NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
MAX_NAME = 64

_MODULES: dict[tuple[str, str], str] = {}  # (kind, name) -> the module that registered it


def check_name(kind: str, name: object) -> str:
    """`name` if it can name a `kind` in a run folder: lower-case letters, digits and underscores,
    starting with a letter, at most MAX_NAME long; ValueError saying so otherwise."""
    if not isinstance(name, str) or not NAME.match(name) or len(name) > MAX_NAME:
        raise ValueError(f"{name!r} cannot name a {kind}: a {kind}'s name becomes a file or folder name in "
                         f"run folders, so it must be lower-case letters, digits and underscores, start with "
                         f"a letter and be at most {MAX_NAME} characters (e.g. 'center_half').")
    return name


def as_name(text: str) -> str:
    """A name as typed (``--backbones Inception-V3``, ``--views Center``) as the registries spell
    names: no surrounding spaces, lower case, underscores for hyphens."""
    return text.strip().lower().replace("-", "_")


def caller_module(depth: int) -> str:
    """The module `depth` frames above the caller (a registry's ``register`` asks for its own caller)."""
    return sys._getframe(depth + 1).f_globals.get("__name__", SCRIPT)


def add(kind: str, registry: dict, name: str, entry: object, module: str | None = None) -> None:
    """A registry's ``register``: check `name`, refuse a taken one, add `entry` and record the module
    that registered it (`module`, default: the caller of that ``register``)."""
    check_name(kind, name)
    if name in registry:
        raise ValueError(f"a {kind} named {name!r} is already registered")
    registry[name] = entry
    record(kind, name, module or caller_module(2))


def remove(kind: str, registry: dict, name: str, built_in: frozenset) -> None:
    """A registry's ``unregister``: a plug-in goes; the package's own entries stay."""
    if name in built_in:
        raise ValueError(f"the {kind} {name!r} is built in and cannot be unregistered")
    registry.pop(name, None)
    forget(kind, name)


def record(kind: str, name: str, module: str) -> None:
    """Note that `module` registered the `kind` called `name` (built-ins are never recorded)."""
    _MODULES[(kind, name)] = module


def forget(kind: str, name: str) -> None:
    _MODULES.pop((kind, name), None)


def module_of(kind: str, name: str) -> str | None:
    """The module that registered a plug-in, or None for the package's own entries."""
    return _MODULES.get((kind, name))


def used(kind: str, names: Iterable[str]) -> dict[str, str]:
    """Of `names` (of one kind), the plug-ins, each with the module that registered it."""
    return {name: module_of(kind, name) for name in names if module_of(kind, name) is not None}


def merge(*records: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, str]]:
    """Plug-in records (kind -> name -> module) combined, later ones winning; empty kinds left out."""
    out: dict[str, dict[str, str]] = {}
    for rec in records:
        for kind, names in (rec or {}).items():
            if isinstance(names, dict):
                out.setdefault(kind, {}).update({str(k): str(v) for k, v in names.items()})
    return {kind: names for kind, names in out.items() if names}


def modules_in(record_: Mapping[str, Mapping[str, str]] | None) -> list[str]:
    """The importable modules of a plug-in record, each once (a script's registrations cannot be imported)."""
    found = [m for names in (record_ or {}).values() if isinstance(names, dict) for m in names.values()]
    return [m for m in dict.fromkeys(found) if isinstance(m, str) and m != SCRIPT]


def split(text: str | None) -> list[str]:
    """A comma-separated list of module names (blank items left out)."""
    return [m.strip() for m in (text or "").split(",") if m.strip()]


def load(modules: Sequence[str], source: str) -> None:
    """Import each of `modules` (registering what they register); UserError naming the module and
    where it was named (`source`, e.g. "--plugins") when one cannot be imported."""
    for module in modules:
        if module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # an import runs arbitrary code: any error is the plug-in's
            raise UserError(f"The plug-in module {module!r} (named by {source}) cannot be imported "
                            f"({type(exc).__name__}: {exc}). Make it importable (install it, or add its folder "
                            f"to PYTHONPATH), or leave it out of {source}.") from None


def recorded_in_run(run_dir: str | os.PathLike | None) -> dict[str, dict[str, str]]:
    """The plug-ins a run folder's config.json records ({} when there is none or it is unreadable)."""
    if not run_dir:
        return {}
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return merge(config.get("plugins")) if isinstance(config, dict) else {}


def load_for_command(named: str | None, run_dir: str | None) -> None:
    """What the CLI imports before it parses a command: the modules of TRANSFER_ENSEMBLE_PLUGINS and
    --plugins (an error if one fails), then those the run records (a failure is left to the step
    that needs the plug-in, which says what is missing)."""
    load(split(os.environ.get(ENV)), ENV)
    load(split(named), "--plugins")
    for module in modules_in(recorded_in_run(run_dir)):
        try:
            load([module], f"{run_dir}/config.json")
        except UserError as exc:
            log.debug("%s", exc)


def missing_message(kind: str, name: str, module: str | None, what: str) -> str:
    """Why `what` (e.g. "The head recipe 'knn-folds2' of runs/x") cannot be used: its `kind` `name`
    is not registered in this process, and how to register it."""
    if module is None:
        how = (f"Register it before this command runs: put the registration in a module and pass "
               f"`--plugins MODULE` (or set {ENV}=MODULE)")
    elif module == SCRIPT:
        how = (f"It was registered from a script or notebook, which cannot be imported again: move the "
               f"registration into a module and pass `--plugins MODULE` (or set {ENV}=MODULE)")
    else:
        how = (f"It was registered by the module {module!r}: pass `--plugins {module}` (or set "
               f"{ENV}={module}), or import {module} before calling transfer_ensemble from Python")
    return (f"{what} uses the {kind} {name!r}, which is not registered in this process. {how}.")

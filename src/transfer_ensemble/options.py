"""How an option is declared: one dataclass field whose metadata holds its flag, help, rule and owner.

argparse's options, the override dicts, ``run --config`` merging and the checks are all derived
from these fields (see config.py and cli.py), so adding an option is adding one field::

    epochs: int = option(50, "--epochs", "most epochs per head (default 50)", whole(1))

A refusal names the option as its caller knows it: the flag for the command line and for files
(with the file and its key), the parameter name for a Python caller (with the call it came from).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from transfer_ensemble.errors import UserError

COMMAND_LINE = "the command line"


class PythonOrigin(str):
    """Where a Python caller's value came from, e.g. ``workflow.train(..., overrides)``."""


class Overrides(dict):
    """Options given on top of saved ones (None: not given), and where they came from."""

    def __init__(self, values: dict | None = None, origin: str = COMMAND_LINE):
        super().__init__(values or {})
        self.origin = origin


def python_overrides(values: "dict | None", call: str) -> Overrides:
    """`values` as given by a Python caller of `call` (kept as is when already tagged)."""
    if isinstance(values, Overrides):
        return values
    if values is not None and not isinstance(values, dict):
        raise UserError(f"{call} takes a dict of option names and values, not {values!r}.")
    return Overrides(values, PythonOrigin(call))


Where = Callable[[str], "str | None"]


def python_whole(call: str, key: str, value: Any, low: int, flag: str) -> int:
    """A whole number given to a Python `call` as `key` (the CLI's `flag`), in the words of any option."""
    return Checker(lambda _: PythonOrigin(call), {key: flag}).whole(key, value, low)


def nowhere(key: str) -> None:
    return None


def describe(value: Any) -> str:
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


class Checker:
    """Builds the one-paragraph errors for one section, naming each key as its origin knows it."""

    def __init__(self, where: Where, flags: dict[str, str]):
        self.where = where
        self.flags = flags

    def name(self, key: str) -> str:
        """The flag, or the parameter name for a Python caller."""
        return key if isinstance(self.where(key), PythonOrigin) else self.flags.get(key, key)

    def fail(self, key: str, value: Any, problem: str) -> UserError:
        origin = self.where(key)
        flag = self.flags.get(key, key)
        if origin is None:
            return UserError(f"{flag} {value!r} (parameter {key}) {problem}.")
        if isinstance(origin, PythonOrigin):
            return UserError(f"{key}={value!r} (given to {origin}) {problem}.")
        if origin == COMMAND_LINE:
            return UserError(f"{flag} {value!r} (given on the command line) {problem}.")
        return UserError(f'{flag} {value!r} (the "{key}" entry of {origin}) {problem}.')

    def whole(self, key: str, value: Any, low: int | None, high: int | None = None, why: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = ""
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                hint = f": write {value.strip()} without quotes"
            raise self.fail(key, value, f"must be a whole number, not {value!r} ({describe(value)}){hint}")
        if low is not None and (value < low or (high is not None and value > high)):
            allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise self.fail(key, value, f"is out of range: it must be a whole number {allowed}{why}")
        return value

    def real(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, value, f"must be a number, not {value!r} ({describe(value)})")
        if not math.isfinite(value):
            raise self.fail(key, value, "must be a finite number, not NaN or infinity")
        return value

    def flag(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, value, f"must be true or false, not {value!r} ({describe(value)})")
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(key, value, f"is not allowed: it must be one of {', '.join(map(repr, allowed))}")
        return value


Check = Callable[[Checker, str, Any, dict], Any]
"""(checker, key, value, the section's values checked so far) -> the value, normalised."""


@dataclass(frozen=True)
class Rule:
    """What values an option takes: `kind` gives its argparse type (int, real, bool, text)."""

    kind: str
    check: Check
    describe: str = ""


def whole(low: int | None = None, high: int | None = None, why: str = "") -> Rule:
    return Rule("int", lambda c, k, v, _: c.whole(k, v, low, high, why),
                f"a whole number {'from ' + str(low) if low is not None else ''}"
                f"{' to ' + str(high) if high is not None else ''}".strip())


def real(low: float | None = None, high: float | None = None, above: bool = False, below: bool = False,
         why: str = "", allowed: str = "") -> Rule:
    """A finite number from `low` to `high` (`above`/`below`: excluding that end); `allowed` says
    the range in words where the default wording does not fit."""
    parts = ([f"{'above' if above else 'at least'} {low:g}"] if low is not None else []) \
        + ([f"{'below' if below else 'at most'} {high:g}"] if high is not None else [])
    allowed = allowed or " and ".join(parts)

    def check(c: Checker, key: str, value: Any, _: dict) -> float:
        c.real(key, value)
        if (low is not None and (value <= low if above else value < low)) \
                or (high is not None and (value >= high if below else value > high)):
            raise c.fail(key, value, f"is out of range: it must be {allowed}{why}")
        return value

    return Rule("real", check, f"a number {allowed}".strip())


def boolean() -> Rule:
    return Rule("bool", lambda c, k, v, _: c.flag(k, v), "true or false")


def choice(allowed: "tuple[str, ...] | Callable[[], tuple[str, ...]]") -> Rule:
    """One of `allowed` (or of what it returns when called: a registry's names, read when checked)."""
    names = allowed if callable(allowed) else (lambda: allowed)
    return Rule("text", lambda c, k, v, _: c.choice(k, v, tuple(names())), "one of the listed names")


@dataclass(frozen=True)
class Option:
    """An option's metadata. `owner`: the value of `owner_key` (e.g. engine "ray") that takes it;
    `optional`: None is allowed (and means "not given")."""

    flag: str | None
    help: str
    rule: Rule
    group: str | None = None
    owner: str | None = None
    owner_key: str | None = None
    optional: bool = False

    @property
    def dest(self) -> str:
        """The argparse attribute the flag is parsed into."""
        return self.flag.lstrip("-").replace("-", "_")


def option(default: Any, flag: str | None, help: str, rule: Rule, *, group: str | None = None,
           owner: str | None = None, owner_key: str | None = None, optional: bool = False) -> Any:
    """A dataclass field declaring one option (see the module docstring)."""
    meta = Option(flag, help, rule, group, owner, owner_key, optional)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": meta})
    return field(default=default, metadata={"option": meta})


def declared(cls: type) -> list[tuple[str, Any, Option]]:
    """(name, default, Option) of every declared option of dataclass `cls`, in order."""
    return [(f.name, f.default, f.metadata["option"]) for f in fields(cls) if "option" in f.metadata]


def flags_of(cls: type) -> dict[str, str]:
    return {name: meta.flag for name, _, meta in declared(cls) if meta.flag}


def check_values(cls: type, values: dict, where: Where, flags: dict[str, str] | None = None) -> dict:
    """Every declared option of `cls` in `values`, checked by its rule in order; returns them normalised."""
    checker = Checker(where, flags or flags_of(cls))
    out = dict(values)
    for name, _, meta in declared(cls):
        if name not in out or (meta.optional and out[name] is None):
            continue
        if meta.owner is not None and out.get(meta.owner_key) != meta.owner:
            raise checker.fail(name, out[name], f"is a {meta.owner.capitalize()} option: add "
                                                f"{checker.name(meta.owner_key)} {meta.owner}, or leave it out")
        out[name] = meta.rule.check(checker, name, out[name], out)
    return out


def check_self(obj: Any) -> dict:
    """A dataclass instance's options checked (a Python caller built it: refusals name the parameter)."""
    return check_values(type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)}, nowhere)


def refuse_unknown(keys: Iterable[str], known: Iterable[str], origin: str) -> None:
    """A UserError naming the first key of `keys` not in `known`, and the close match."""
    known = sorted(set(known))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the options are {', '.join(map(repr, known))}."
            raise UserError(f"{key!r} (given to {origin}) is not an option: {hint}")

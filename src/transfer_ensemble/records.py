"""Reading a run folder's records: a file that is missing or damaged is a `DamagedFile` naming it,
which each step turns into a `UserError` saying how to repair it; and the digests that give an
input its identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from transfer_ensemble.errors import UserError
from transfer_ensemble.storage import read_json


class DamagedFile(Exception):
    """A run-folder file that is missing, truncated or not what it should be."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path
        self.why = why


def load_json(path: Path, kind: type = dict) -> Any:
    """The JSON in `path`, which must be a `kind`; DamagedFile (naming the file) otherwise."""
    try:
        obj = read_json(path)
    except FileNotFoundError:
        raise DamagedFile(path, "is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFile(path, f"is not valid JSON ({exc})") from None
    except OSError as exc:
        raise DamagedFile(path, f"cannot be read ({exc.strerror})") from None
    if not isinstance(obj, kind):
        raise DamagedFile(path, f"holds a {type(obj).__name__}, not a {kind.__name__}")
    return obj


def load_npy(path: Path, shape: Sequence[int | None] | None = None, dtype: Any = None,
             mmap: bool = False) -> np.ndarray:
    """The array in `path`, checked against `shape` (None matches any length) and `dtype`."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DamagedFile(path, "is missing") from None
    except (ValueError, EOFError, OSError) as exc:
        raise DamagedFile(path, f"is not a readable .npy array ({exc})") from None
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise DamagedFile(path, f"holds {array.dtype} values, not {np.dtype(dtype)}")
    if shape is not None and (array.ndim != len(shape)
                              or any(s is not None and s != a for s, a in zip(shape, array.shape))):
        want = "x".join("any" if s is None else str(s) for s in shape)
        raise DamagedFile(path, f"has shape {array.shape}, not {want}")
    return array


def digest(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted): the identity of an input."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()


def damaged(exc: DamagedFile, fix: str) -> UserError:
    """The error a step raises for a damaged run-folder file: what is wrong, then the `fix`."""
    return UserError(f"The run folder file {exc.path} {exc.why}. {fix}.")

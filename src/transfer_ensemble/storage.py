"""Atomic file writes and the run-folder lock: nothing the tool writes is ever half-written."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from transfer_ensemble.errors import UserError


FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
NOT_A_FOLDER_ERRNOS = frozenset({errno.ENOTDIR, errno.EEXIST})
WRITE_ERRNOS = FULL_DISK_ERRNOS | NOT_WRITABLE_ERRNOS | NOT_A_FOLDER_ERRNOS | {errno.EISDIR}

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Permissions of written files: what a plain open() would give (mkstemp's own are 0600)."""


def _disk_error(path: Path, exc: OSError, action: str = "write") -> UserError:
    """The clear message for an OSError raised while trying to `action` `path`."""
    if exc.errno in FULL_DISK_ERRNOS:
        why = ("the disk is full" if exc.errno == errno.ENOSPC
               else f"the disk quota or file size limit is reached ({exc.strerror})")
        fix = "free some space (or point --run at another disk) and run the same command again"
    elif exc.errno == errno.EROFS:
        why = "the file system is read-only"
        fix = "choose a --run (or --out) folder on a writable disk"
    elif exc.errno in NOT_WRITABLE_ERRNOS:
        why = ("the folder is not writable (permission denied)" if action == "write"
               else "permission denied")
        fix = "choose a writable --run (or --out) folder or fix its permissions"
    elif exc.errno == errno.EISDIR:
        why = "it is a folder, not a file"
        fix = "pass the path of a file to write (e.g. --out submissions/NAME.csv), not a folder"
    elif exc.errno in NOT_A_FOLDER_ERRNOS:
        why = "a part of that path is an existing file, not a folder"
        fix = "choose a --run (or --out) path whose parents are folders, or move that file away"
    else:
        why = exc.strerror or str(exc)
        fix = "check the disk and run the same command again"
    return UserError(
        f"Could not {action} {path}: {why}. Nothing was corrupted: files are written to a temporary "
        f"name and renamed only when complete, and finished work is kept. Fix: {fix}."
    )


@contextlib.contextmanager
def disk_errors(default_path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError that writing can raise (full disk, read-only...) into a UserError.

    The message names the file in the error, else `default_path`. Other OSErrors pass through.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise _disk_error(Path(exc.filename or default_path), exc, "read or write") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A symbolic link is written through (its target is replaced, the link stays). A FIFO or a
    device is never replaced by a regular file: what the block wrote is copied into it. A path
    naming one of this process's open streams (/dev/stdout, /dev/fd/N...) is written into that
    stream.
    """
    path = Path(path)
    fd = stream_fd(path)
    if fd is not None:
        with _into_stream(path, fd, suffix) as tmp:
            yield tmp
        return
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise _disk_error(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path)))
    if target.exists() and not target.is_file():
        with _into_special_file(path, target, suffix) as tmp:
            yield tmp
        return
    path = target
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
    except OSError as exc:
        raise _disk_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        _remove_quietly(tmp_path)
        raise _disk_error(path, exc) from None
    except BaseException:
        _remove_quietly(tmp_path)
        raise
    _fsync_folder(path.parent)


STREAM_NAMES = {"/dev/stdout": 1, "/dev/stderr": 2}
_FD_PATH = re.compile(r"/(?:dev|proc/self)/fd/(\d+)")


def stream_fd(path: str | os.PathLike) -> int | None:
    """The file descriptor of this process that `path` names (/dev/stdout, /dev/stderr,
    /dev/fd/N, /proc/self/fd/N), else None."""
    text = os.fspath(path)
    match = _FD_PATH.fullmatch(text)
    return STREAM_NAMES.get(text, int(match.group(1)) if match else None)


@contextlib.contextmanager
def _into_stream(path: Path, fd: int, suffix: str) -> Iterator[Path]:
    """Write to a temporary file, then into the open descriptor `fd` where it stands: a file
    opened for append keeps its contents, a pipe or a terminal gets the bytes.

    Following the link instead would replace the file stdout is redirected to, or fail on a pipe;
    fd 2 may be the noise filter's pipe, which passes the lines on in order.
    """
    fd_, tmp = tempfile.mkstemp(prefix=".transfer-ensemble.", suffix=f".tmp{suffix}")
    os.close(fd_)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        with open(tmp_path, "rb") as source:
            while chunk := source.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
    except OSError as exc:
        raise _disk_error(path, exc) from None
    finally:
        _remove_quietly(tmp_path)


@contextlib.contextmanager
def _into_special_file(path: Path, target: Path, suffix: str) -> Iterator[Path]:
    """Write to a temporary file, then copy it into a FIFO or device `target` (opened as a file)."""
    fd, tmp = tempfile.mkstemp(prefix=".transfer-ensemble.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    except OSError as exc:
        raise _disk_error(path, exc) from None
    finally:
        _remove_quietly(tmp_path)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any], suffix: str = "") -> None:
    """Call `writer(tmp_path)` and move the result to `path` in one rename."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    write_atomic(path, save)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class FolderBusy(UserError):
    """``run_lock``'s refusal: another process holds the lock (`owner`: the pid it wrote, or "unknown")."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; the OS drops it when the process dies."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_file = _open_lock_file(run_dir / ".lock")
    except OSError as exc:
        raise _disk_error(run_dir, exc) from None
    try:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "unknown"
            raise FolderBusy(
                f"The run folder {run_dir} is in use by another transfer-ensemble process "
                f"(pid {owner}). Two processes writing one run folder would corrupt it. Wait for "
                f"that process to finish, or use another --run folder.", owner
            ) from None
        if lock_file.writable():
            try:
                lock_file.seek(0)
                lock_file.truncate()
                lock_file.write(str(os.getpid()))
                lock_file.flush()
            except OSError as exc:  # a full disk is met here first, before any step writes
                raise _disk_error(run_dir / ".lock", exc) from None
        yield
    finally:
        lock_file.close()


def _open_lock_file(path: Path):
    """Open the lock file for writing our pid; read-only when the folder is (flock works on both).

    A read-only run folder can still be read by `submit`; a step that writes fails at its first
    write with a clear message.
    """
    try:
        return open(path, "a+")
    except OSError as exc:
        if exc.errno not in NOT_WRITABLE_ERRNOS or not path.exists():
            raise
        return open(path, "r")

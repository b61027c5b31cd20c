"""Faults: SIGKILL during `train` and `submit`, a full disk, an unwritable folder, two processes.

`extract` killed and resumed is covered in tests/test_feature_cache.py. One extracted run folder
is shared by the module and copied (cheaply) for each test that changes it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_TRAIN, TINY, make_kaggle, run_cli, run_in_process
from transfer_ensemble import cli, storage
from transfer_ensemble.config import SeedOptions, TrainConfig
from transfer_ensemble.recipes import FoldFiles, Recipe, recipe_for
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.views import PAIR as VIEWS

FOLDS = 2
JOBS = [(view, fold) for view in VIEWS for fold in range(FOLDS)]
FAST_CONFIG = TrainConfig(head="seed", folds=FOLDS, options=SeedOptions(epochs=3, patience=2))  # what FAST_TRAIN trains


def recipe(run: Path) -> Recipe:
    return recipe_for(RunFolder(run), FAST_CONFIG)


def fold(run: Path, view: str, k: int) -> FoldFiles:
    return recipe(run).fold(view, k)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    run = base / "extracted"
    result = run_cli("extract", "--data", str(data), "--run", str(run), "--backbones", "xception",
                     "--weights", "random", "--image-size", str(TINY), "--batch-size", "8", "--scales", "1")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def reference(extracted: Path) -> dict:
    """An uninterrupted train + submit: what every interrupted run must end up equal to."""
    run = extracted.with_name("reference")
    shutil.copytree(extracted, run)
    assert run_in_process("train", "--run", str(run), *FAST_TRAIN).returncode == 0
    out = run.parent / "reference.csv"
    # submit in its own process: its time, Python's start included, places the kills below
    start = time.perf_counter()
    assert run_cli("submit", "--run", str(run), "--out", str(out)).returncode == 0
    return {"run": run, "submit_seconds": time.perf_counter() - start,
            "metrics": recipe(run).metrics(), "csv": out.read_bytes(),
            "test_pred": {job: np.load(fold(run, *job).test_pred) for job in JOBS},
            "oof": {view: np.load(recipe(run).oof(view)) for view in VIEWS}}


def copy_run(source: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def assert_same_results(run: Path, reference: dict) -> None:
    assert recipe(run).metrics() == reference["metrics"]
    for job in JOBS:
        np.testing.assert_array_equal(np.load(fold(run, *job).test_pred), reference["test_pred"][job])
    for view in VIEWS:
        np.testing.assert_array_equal(np.load(recipe(run).oof(view)), reference["oof"][view])


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# ---- SIGKILL ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_killed_after_a_fold_resumes_without_retraining_it(extracted: Path, reference: dict,
                                                                 tmp_path: Path) -> None:
    run = copy_run(extracted, tmp_path)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "transfer_ensemble", "train", "--run", str(run), *FAST_TRAIN]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "original fold 0: val log loss" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)

    first = fold(run, "original", 0).folder
    assert fold(run, "original", 0).done.exists()
    unfinished = [job for job in JOBS if not fold(run, *job).done.exists()]
    assert unfinished, "the kill came too late: every fold had finished"
    assert not recipe(run).metrics_path.exists()
    finished_files = mtimes(first)
    # What a kill during a write leaves (this one may have landed between writes): temporary files.
    planted = [run / ".config.json.k1ll3d.tmp", recipe(run).folder / "flipped" / ".oof_x.npy.k1ll3d.tmp"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    not_ours = run / ".notes.k1ll3d.tmp"
    not_ours.write_text("a user's file")

    result = run_cli("train", "--run", str(run), *FAST_TRAIN)
    assert result.returncode == 0, result.stderr
    reused = len(JOBS) - len(unfinished)
    assert f"reusing {reused} finished fold models; training {len(unfinished)}" in result.stderr
    assert "original fold 0: val log loss" not in result.stderr
    assert mtimes(first) == finished_files, "a finished fold was written again"
    assert_same_results(run, reference)
    assert temporary_files(run / "heads") == [] and not planted[0].exists()
    assert not_ours.read_text() == "a user's file"


SUBMIT_DIES_WHILE_WRITING = """
import os, signal, sys
import pandas as pd
real_to_csv = pd.DataFrame.to_csv

def to_csv_then_die(self, path, *args, **kwargs):
    real_to_csv(self, path, *args, **kwargs)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

pd.DataFrame.to_csv = to_csv_then_die
from transfer_ensemble.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_submit_killed_while_writing_leaves_no_csv_or_the_old_complete_one(reference: dict,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "subs" / "sub.csv"
    killed = subprocess.run([sys.executable, "-c", SUBMIT_DIES_WHILE_WRITING, "submit", "--run",
                             str(reference["run"]), "--out", str(out)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists(), "a half-written submission is visible under its final name"

    old = b"id,a,b\nx,0.5,0.5\n"
    out.write_bytes(old)
    killed = subprocess.run([sys.executable, "-c", SUBMIT_DIES_WHILE_WRITING, "submit", "--run",
                             str(reference["run"]), "--out", str(out)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert out.read_bytes() == old
    leftovers = [p.name for p in out.parent.iterdir() if p != out]
    assert leftovers and all(name.startswith(".sub.csv.") for name in leftovers), leftovers

    assert run_cli("submit", "--run", str(reference["run"]), "--out", str(out)).returncode == 0
    assert out.read_bytes() == reference["csv"]


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.7, 0.85, 0.95, 1.0])
def test_submit_killed_at_any_moment_leaves_no_csv_or_a_complete_one(reference: dict, tmp_path: Path,
                                                                      fraction: float) -> None:
    """Killed late in its run (most of a submit is starting Python): the CSV is absent or whole."""
    out = tmp_path / "sub.csv"
    delay = fraction * reference["submit_seconds"]
    proc = subprocess.Popen([sys.executable, "-m", "transfer_ensemble", "submit", "--run", str(reference["run"]),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists() or out.read_bytes() == reference["csv"]


# ---- full disk, unwritable folders -----------------------------------------------------------

@pytest.mark.slow
def test_full_disk_while_writing_the_submission_keeps_the_old_file(reference: dict, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    out = tmp_path / "sub.csv"
    out.write_bytes(reference["csv"][:40] + b"... an older submission\n")
    old = out.read_bytes()

    def half_then_full(self, path, *args, **kwargs):
        Path(path).write_text("id,class_2,class_1,class_0\nte04,0.3")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    code = cli.main(["submit", "--run", str(reference["run"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"Could not write {out}: the disk is full." in err and "run the same command again" in err
    assert out.read_bytes() == old
    assert sorted(tmp_path.iterdir()) == [out], "the temporary file must be removed"


@pytest.mark.slow
def test_full_disk_during_train_then_rerun_gives_the_same_result(extracted: Path, reference: dict,
                                                                 tmp_path: Path, monkeypatch, capsys) -> None:
    run = copy_run(extracted, tmp_path)
    real_save = np.save
    calls = []

    def save_until_full(file, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second array of the first fold: val_index.npy is done, val_pred.npy is not
            file.write(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    code = cli.main(["train", "--run", str(run), *FAST_TRAIN])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    first = fold(run, "original", 0)
    assert f"Could not write {first.val_pred}: the disk is full" in err
    assert not first.val_pred.exists() and not first.done.exists()
    assert temporary_files(run) == []

    monkeypatch.setattr(np, "save", real_save)
    assert cli.main(["train", "--run", str(run), *FAST_TRAIN]) == 0
    assert_same_results(run, reference)


def test_full_disk_outside_the_atomic_writers_is_still_a_clear_error(tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    """Feature arrays are memory maps, not atomic writes: their OSError is caught around the step."""
    data = make_kaggle(tmp_path / "data")
    run = tmp_path / "run"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", no_space)
    code = cli.main(["extract", "--data", str(data), "--run", str(run), "--backbones", "xception",
                     "--weights", "random", "--image-size", str(TINY), "--scales", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    message = err.split("error: ", 1)[1]
    assert message.count("\n") == 1 and message.startswith(f"Could not read or write {run}: the disk is full.")


def test_run_folder_under_a_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    data = make_kaggle(tmp_path / "data")
    code = cli.main(["extract", "--data", str(data), "--run", str(blocker / "run"), "--weights", "random"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.split("error: ", 1)[1].count("\n") == 1
    assert f"Could not write {blocker / 'run'}: a part of that path is an existing file, not a folder." in err
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.slow
def test_submission_path_under_a_file_is_a_clear_error(reference: dict, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "subs"
    blocker.write_text("")
    code = cli.main(["submit", "--run", str(reference["run"]), "--out", str(blocker / "sub.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"Could not write {blocker / 'sub.csv'}: a part of that path is an existing file" in err


@pytest.mark.slow
@pytest.mark.parametrize("err_no, why", [(errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "the folder is not writable (permission denied)")])
def test_unwritable_run_folder_is_a_clear_error(reference: dict, tmp_path: Path, monkeypatch, capsys,
                                                err_no: int, why: str) -> None:
    """As root, chmod does not stop writes: the OS refusal is simulated where files are created."""
    run = copy_run(reference["run"], tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    def refuse(*args, **kwargs):
        raise OSError(err_no, os.strerror(err_no), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code = cli.main(["train", "--run", str(run), *FAST_TRAIN, "--epochs", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    other = recipe_for(RunFolder(run), TrainConfig(head="seed", folds=FOLDS, options=SeedOptions(epochs=4, patience=2)))
    assert f"Could not write {other.record_path}: {why}." in err
    assert {p: p.read_bytes() for p in before} == before


# ---- two processes on one run folder ---------------------------------------------------------

@pytest.mark.slow
def test_second_process_on_a_locked_run_folder_refuses(reference: dict, tmp_path: Path) -> None:
    run = reference["run"]
    with storage.run_lock(run):
        for args in (["train", "--run", str(run), *FAST_TRAIN], ["submit", "--run", str(run), "--out",
                                                                  str(tmp_path / "s.csv")]):
            result = run_cli(*args)
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert (f"The run folder {run} is in use by another transfer-ensemble process "
                    f"(pid {os.getpid()})") in result.stderr
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_a_dead_holder_does_not_keep_the_lock(reference: dict, tmp_path: Path) -> None:
    run = copy_run(reference["run"], tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from transfer_ensemble import storage\n"
                               "with storage.run_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(120)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert run_cli("submit", "--run", str(run), "--out", str(tmp_path / "s.csv")).returncode == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    holder.stdout.close()
    assert (run / ".lock").read_text() == str(holder.pid), "the dead pid is still written there"
    result = run_cli("submit", "--run", str(run), "--out", str(tmp_path / "s.csv"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.csv").read_bytes() == reference["csv"]


# ---- data changed after training -------------------------------------------------------------

@pytest.mark.slow
def test_new_test_images_after_training_are_predicted_without_retraining(reference: dict,
                                                                        tmp_path: Path) -> None:
    """Stale heads are never used silently: submit waits for train, which only re-predicts."""
    old_data = Path(json.loads((reference["run"] / "dataset.json").read_text())["root"])
    data = Path(shutil.copytree(old_data, tmp_path / "data"))
    shutil.copy2(data / "test" / "te00.png", data / "test" / "te_new.png")
    sample = pd.read_csv(data / "sample_submission.csv")
    pd.concat([sample, sample.iloc[:1].assign(id="te_new")]).to_csv(data / "sample_submission.csv", index=False)
    run = copy_run(reference["run"], tmp_path)
    models = {job: fold(run, *job).model(".keras").stat().st_mtime_ns for job in JOBS}

    result = run_cli("extract", "--data", str(data), "--run", str(run), "--backbones", "xception",
                     "--weights", "random", "--image-size", str(TINY), "--batch-size", "8", "--scales", "1")
    assert result.returncode == 0, result.stderr
    stale = run_cli("submit", "--run", str(run), "--out", str(tmp_path / "stale.csv"))
    assert stale.returncode == 2 and "The test features of" in stale.stderr
    assert f"changed after the head recipe '{recipe(run).name}' predicted them" in stale.stderr
    assert not (tmp_path / "stale.csv").exists()

    result = run_cli("train", "--run", str(run), *FAST_TRAIN)
    assert result.returncode == 0, result.stderr
    assert f"predicting them again with {len(JOBS)} finished fold models" in result.stderr
    assert {job: fold(run, *job).model(".keras").stat().st_mtime_ns for job in JOBS} == models
    assert recipe(run).metrics() == reference["metrics"]

    out = tmp_path / "sub.csv"
    assert run_cli("submit", "--run", str(run), "--out", str(out)).returncode == 0
    new = pd.read_csv(out).set_index("id")
    before = pd.read_csv(io.BytesIO(reference["csv"])).set_index("id")
    assert list(new.index) == [*before.index, "te_new"]
    pd.testing.assert_frame_equal(new.loc[before.index], before)
    pd.testing.assert_series_equal(new.loc["te_new"], new.loc["te00"], check_names=False)


class _FullDiskLockFile:
    """A lock file on a full disk: it opens and locks, but writing the pid fails with ENOSPC."""

    def __init__(self, real) -> None:
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_no_room_for_the_lock_is_a_clear_error_and_leaves_no_run_folder(tmp_path: Path, monkeypatch, capsys):
    """The first write of a step is the lock's pid: on a full disk it is one paragraph and exit 2,
    and the run folder the step created is removed again (issue 27 item 5)."""
    real_open = storage._open_lock_file
    monkeypatch.setattr(storage, "_open_lock_file", lambda path: _FullDiskLockFile(real_open(path)))
    data = make_kaggle(tmp_path / "data")
    run = tmp_path / "runs" / "new"
    code = cli.main(["extract", "--data", str(data), "--run", str(run), "--weights", "random", "--scales", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{run / '.lock'}: the disk is full" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_no_room_for_a_predict_cache_is_a_clear_error_and_leaves_no_folder(reference: dict, tmp_path: Path,
                                                                           monkeypatch, capsys):
    real_open = storage._open_lock_file
    monkeypatch.setattr(storage, "_open_lock_file", lambda path: _FullDiskLockFile(real_open(path)))
    data = reference["run"].parent / "data"
    cache = tmp_path / "cache"
    code = cli.main(["predict", "--run", str(reference["run"]), "--images", str(data / "test"),
                     "--out", str(tmp_path / "p.csv"), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "the disk is full" in err
    assert not cache.exists() and not (tmp_path / "p.csv").exists()

"""Shared fixtures: tiny generated data sets in both layouts, and ways to call the CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs3"
TINY = 75  # the smallest input InceptionV3 accepts; Xception needs 71
FAST_EXTRACT = ["--weights", "random", "--image-size", str(TINY), "--batch-size", "8", "--scales", "1"]
FAST_TRAIN = ["--head", "seed", "--folds", "2", "--epochs", "3", "--patience", "2"]

COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]


def draw(class_index: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A small RGB image whose colour says its class, with noise so no two are equal."""
    image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = COLORS[class_index % len(COLORS)]
    return image


def save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(data.tobytes())


def make_kaggle(root: Path, n_classes: int = 3, per_class: int = 4, n_test: int = 5, seed: int = 0,
                ext: str = ".png") -> Path:
    """labels.csv, train/<id>, test/<id>, sample_submission.csv with classes in reverse name order."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{c}" for c in range(n_classes)]
    rows = []
    for c in range(n_classes):
        for i in range(per_class):
            image_id = f"tr{c}_{i}"
            save_rgb(root / "train" / f"{image_id}{ext}", draw(c, rng))
            rows.append((image_id, classes[c]))
    pd.DataFrame(rows, columns=["id", "breed"]).to_csv(root / "labels.csv", index=False)
    test_ids = [f"te{i:02d}" for i in range(n_test)]
    for i, image_id in enumerate(test_ids):
        save_rgb(root / "test" / f"{image_id}{ext}", draw(i % n_classes, rng))
    order = list(reversed(classes))
    sample = pd.DataFrame({"id": list(reversed(test_ids)), **{c: 1 / n_classes for c in order}})
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


def make_folders(root: Path, n_classes: int = 3, per_class: int = 4, n_valid: int = 1, n_test: int = 2,
                 labelled_test: bool = True, seed: int = 0) -> Path:
    """train/<class>/, validation/<class>/ and test/ (class folders when `labelled_test`)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        name = f"kind {c}"
        for i in range(per_class):
            save_rgb(root / "train" / name / f"a{i}.jpg", draw(c, rng))
        for i in range(n_valid):
            save_rgb(root / "validation" / name / f"v{i}.jpg", draw(c, rng))
        for i in range(n_test):
            folder = root / "test" / name if labelled_test else root / "test"
            save_rgb(folder / f"t{c}_{i}.jpg", draw(c, rng))
    return root


@pytest.fixture
def kaggle_data(tmp_path: Path) -> Path:
    return make_kaggle(tmp_path / "data")


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    return make_folders(tmp_path / "data")


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module, as a test imports one of the thin entry points."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m transfer_ensemble ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", "transfer_ensemble", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`transfer-ensemble ARGS` in this process, with its exit code and stdout as `run_cli` gives
    them (stderr is left to pytest). For fixtures of many steps: a subprocess starts Python and
    TensorFlow again, several seconds a step; the tests that check a user's process use `run_cli`."""
    import contextlib
    import io

    from transfer_ensemble import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), "")


def kill_part_way(args: list[str], done_file: Path, timeout: float = 300) -> np.ndarray:
    """Run `python -m transfer_ensemble ARGS` and SIGKILL it as soon as `done_file` (a store's
    done flags) says one row is done; returns the flags it left (asserting some, not all, were)."""
    import signal
    import time

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "transfer_ensemble", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env)
    deadline, killed = time.monotonic() + timeout, None
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if np.load(done_file).any():
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed = np.load(done_file)
                break
        except (FileNotFoundError, ValueError, EOFError, OSError):
            pass
        time.sleep(0.005)
    stderr = process.communicate()[1].decode()
    assert killed is not None and not killed.all(), f"not killed part-way:\n{stderr}"
    assert process.returncode == -signal.SIGKILL, stderr
    return killed


@pytest.fixture(scope="session")
def dogs3() -> Path:
    if not SHARED_DOGS.is_dir():
        pytest.skip(f"needs real photos: the dogs3 photo set (583 photos of 3 dog breeds) is not at {SHARED_DOGS} "
                    f"on this machine; every other test generates its images")
    return SHARED_DOGS

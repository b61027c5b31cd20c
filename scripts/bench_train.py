"""Time `transfer-ensemble train` + `submit` on a Kaggle-sized run folder (issue 10's target: <= 60 s).

The run folder is made by the real `extract` (image check, dataset records, feature stores) on
N training and N test images, with one difference: the two backbones are replaced by a lookup of
synthetic features (2 x 2,048 = 4,096 per image, one scale, 120 classes: the Kaggle dog-breed
shape; class means in noise, non-negative like pooled ReLU features, the flipped view a noisy
copy). Each image is a tiny PNG of one colour that encodes its row, so the stand-in knows which
row's features to return. Then the CLI's `train` (the default recipe unless --head) and
`submit` run as subprocesses, as a user runs them, and their wall seconds are printed with the
OOF log loss. The last line is one JSON object.

    python scripts/bench_train.py                 # N = 10,000, 120 classes, 5 folds
    python scripts/bench_train.py --n 600 --classes 12   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transfer_ensemble import backbones, backend, progress, workflow  # noqa: E402
from transfer_ensemble.config import ExtractConfig  # noqa: E402
from transfer_ensemble.runfolder import RunFolder  # noqa: E402

TARGET_SECONDS = 60.0
WIDTH = 2048


def synthetic_features(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and the original and flipped features (n, 2 x WIDTH) of n images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, 2 * WIDTH)).astype(np.float32)
    original = np.abs(rng.normal(size=(n, 2 * WIDTH)).astype(np.float32) + 0.5 * centers[labels])
    flipped = np.abs(original + 0.3 * rng.normal(size=(n, 2 * WIDTH)).astype(np.float32))
    return labels, original, flipped


def write_images(root: Path, labels: np.ndarray, n_train: int) -> None:
    """Folder layout; image i is a 4 x 4 PNG whose colour is i in base 256."""
    for i, label in enumerate(labels):
        folder = root / "train" / f"class{label:03d}" if i < n_train else root / "test"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([i >> 16 & 255, i >> 8 & 255, i & 255], np.uint8)
        cv2.imwrite(str(folder / f"img{i:06d}.png"), np.broadcast_to(colour[::-1], (4, 4, 3)).copy())


def lookup_forward(original: np.ndarray, flipped: np.ndarray):
    """A stand-in for `backend.compile_forward`: each image's row, read from its colour, gives its
    synthetic features (one backbone's half of them), for both views."""
    def compile_forward(model, preprocess, size, batch, replicas=None) -> backend.Forward:
        half = slice(0, WIDTH) if model == "xception" else slice(WIDTH, 2 * WIDTH)

        def dispatch(pixels: np.ndarray) -> np.ndarray:
            rgb = pixels[:, 0, 0, :].astype(np.int64)
            return rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]

        return backend.Forward(dispatch, lambda rows: np.concatenate([original[rows, half], flipped[rows, half]]))

    return compile_forward


def make_run(data: Path, run: Path, n: int, classes: int) -> None:
    labels, original, flipped = synthetic_features(2 * n, classes)
    write_images(data, labels, n)
    backbones.build = lambda spec, *args, **kwargs: spec.name
    backend.compile_forward = lookup_forward(original, flipped)
    progress.show(False)
    logging.getLogger("transfer_ensemble").setLevel(logging.ERROR)  # no "--weights random" warning
    workflow.extract(data, run, ExtractConfig(weights="random", batch_size=256, scales=(1.0,)))


def cli(*args: str) -> float:
    """Wall seconds of one `transfer-ensemble` command, run as a user runs it."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transfer_ensemble", *args], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode != 0:
        sys.exit(f"transfer-ensemble {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="training images (and as many test images)")
    parser.add_argument("--classes", type=int, default=120)
    parser.add_argument("--head", help="train this head instead of the default recipe")
    parser.add_argument("--work", type=Path, help="keep the data and run folder here")
    opts = parser.parse_args()

    work = opts.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        start = time.perf_counter()
        make_run(work / "data", work / "run", opts.n, opts.classes)
        print(f"made a run folder of {opts.n} training and {opts.n} test images x {2 * WIDTH} features, "
              f"{opts.classes} classes, in {time.perf_counter() - start:.0f} s (not timed)", flush=True)
        train = cli("train", "--run", str(work / "run"), *(["--head", opts.head] if opts.head else []))
        submit = cli("submit", "--run", str(work / "run"), "--out", str(work / "submission.csv"))
        recipe = RunFolder(work / "run").select_recipe()
        oof = recipe.metrics()["oof"]["ensemble"]["log_loss"]
        rows = sum(1 for _ in open(work / "submission.csv")) - 1
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)
    total = train + submit
    print(f"recipe {recipe.name}: OOF log loss {oof:.4f}; submission of {rows} rows")
    print(f"train {train:.1f} s + submit {submit:.1f} s = {total:.1f} s   target <= {TARGET_SECONDS:.0f} s   "
          f"{'PASS' if total <= TARGET_SECONDS else 'FAIL'}")
    print(json.dumps({"n": opts.n, "classes": opts.classes, "width": 2 * WIDTH, "recipe": recipe.name,
                      "train_seconds": round(train, 1), "submit_seconds": round(submit, 1),
                      "seconds": round(total, 1), "oof_log_loss": round(oof, 4)}))


if __name__ == "__main__":
    main()

"""Time `transfer-ensemble train` + `submit` at the default's own shape (issue 20's target: <= 60 s).

The run folder is made by the real `extract` (image check, dataset records, feature stores) on
N training and N test images, with one difference: the backbones are replaced by a lookup of
synthetic features. Its shape is the default's, read from the code: every backbone of
`backbones.DEFAULT_BACKBONES` (its registry width, plus its middle layer's with the default
--mid-layer) at every scale of `config.DEFAULT_SCALES`, every view, so the default recipe trains
on the features of all scales and layers side by side and on every view's rows pooled (Xception
2,048 + 728 and InceptionV3 2,048 + 768 at scales 1 and 2: 11,184 features, 2 x 8,000 rows a
fold). 120 classes: the Kaggle dog-breed shape. The features are class means in noise,
non-negative like pooled ReLU features; each further scale and view is a noisy copy of the first.
Each image is a tiny PNG of one colour that encodes its row, so the stand-in knows which row's
features to return. Then the CLI's `train` (the default recipe unless --head) and `submit` run
as subprocesses, as a user runs them; their wall seconds and CPU seconds (user + system of the
subprocess: on a shared machine, wall time is inflated by the other work, CPU time much less)
are printed with the OOF log loss. The last line is one JSON object.

    python scripts/bench_train.py                 # N = 10,000, 120 classes, 5 folds
    python scripts/bench_train.py --n 600 --classes 12   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
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
from transfer_ensemble.blocks import scales_used  # noqa: E402
from transfer_ensemble.config import ExtractConfig, TrainConfig  # noqa: E402
from transfer_ensemble.recipes import select_recipe  # noqa: E402
from transfer_ensemble.runfolder import RunFolder  # noqa: E402
from transfer_ensemble.views import DEFAULT_VIEWS as VIEWS  # noqa: E402  (the default extraction's views)

TARGET_SECONDS = 60.0


def default_blocks() -> list[tuple[str, int, int]]:
    """(backbone, input size, width) of each backbone's pass the default recipe trains on, side by
    side in the order the run folder joins them: every default backbone at the first scale, then
    (if the default recipe is multiscale) at each further default scale. The width is the pass's:
    the final features and, with the default --mid-layer, the middle layer's after them."""
    extract = ExtractConfig()
    scales = scales_used(extract, TrainConfig().multiscale)
    return [(spec.name, extract.size_of(spec, scale), spec.width + (spec.mid_width if extract.mid_of(spec) else 0))
            for scale in scales for spec in map(backbones.get_spec, extract.backbones)]


def synthetic_features(n: int, classes: int, blocks: list[tuple[str, int, int]], seed: int = 0
                       ) -> tuple[np.ndarray, dict[tuple[str, int], dict[str, np.ndarray]]]:
    """Labels, and each block's features of n images per view: {(backbone, size): {view: (n, width)}}."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    first: dict[str, np.ndarray] = {}
    for name, size, width in blocks:
        if name not in first:  # the first scale of this backbone
            centers = rng.normal(size=(classes, width)).astype(np.float32)
            base = rng.normal(size=(n, width)).astype(np.float32)
            base += 0.5 * centers[labels]
            first[name] = base
        else:  # a further scale: a noisy copy of the first
            base = first[name] + 0.5 * rng.normal(size=(n, width)).astype(np.float32)
        views = {VIEWS[0]: np.abs(base)}
        for view in VIEWS[1:]:  # the other views: noisy copies of the first
            views[view] = np.abs(views[VIEWS[0]] + 0.3 * rng.normal(size=(n, width)).astype(np.float32))
        features[(name, size)] = views
    return labels, features


def write_images(root: Path, labels: np.ndarray, n_train: int) -> None:
    """Folder layout; image i is a 4 x 4 PNG whose colour is i in base 256."""
    for i, label in enumerate(labels):
        folder = root / "train" / f"class{label:03d}" if i < n_train else root / "test"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([i >> 16 & 255, i >> 8 & 255, i & 255], np.uint8)
        cv2.imwrite(str(folder / f"img{i:06d}.png"), np.broadcast_to(colour[::-1], (4, 4, 3)).copy())


def lookup_forward(features: dict[tuple[str, int], dict[str, np.ndarray]]):
    """A stand-in for `backend.compile_forward`: each image's row, read from its colour, gives its
    synthetic features of the backbone and input size asked for, for every view."""
    def compile_forward(model, preprocess, size, batch, replicas=None, group=tuple(VIEWS)) -> backend.Forward:
        views = features[(model, size)]

        def dispatch(pixels: np.ndarray) -> np.ndarray:
            rgb = pixels[:, 0, 0, :].astype(np.int64)
            return rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]

        return backend.Forward(dispatch, lambda rows: np.concatenate([views[v][rows] for v in group]))

    return compile_forward


def make_run(data: Path, run: Path, n: int, classes: int, blocks: list[tuple[str, int, int]]) -> None:
    labels, features = synthetic_features(2 * n, classes, blocks)
    write_images(data, labels, n)
    backbones.build = lambda spec, *args, **kwargs: spec.name
    backend.compile_forward = lookup_forward(features)
    progress.show(False)
    logging.getLogger("transfer_ensemble").setLevel(logging.ERROR)  # no "--weights random" warning
    workflow.extract(data, run, ExtractConfig(weights="random", batch_size=256))


def cli(*args: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one `transfer-ensemble` command, run as a
    user runs it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transfer_ensemble", *args], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"transfer-ensemble {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="training images (and as many test images)")
    parser.add_argument("--classes", type=int, default=120)
    parser.add_argument("--head", help="train this head instead of the default recipe")
    parser.add_argument("--work", type=Path, help="keep the data and run folder here (its features are reused "
                                                  "when it has one; its trained recipes are removed)")
    opts = parser.parse_args()

    blocks = default_blocks()
    width = sum(w for _, _, w in blocks)
    work = opts.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        start = time.perf_counter()
        if not (work / "run" / "config.json").exists():
            make_run(work / "data", work / "run", opts.n, opts.classes, blocks)
        shutil.rmtree(work / "run" / "heads", ignore_errors=True)  # a reused folder's recipes would be reused
        print(f"run folder of {opts.n} training and {opts.n} test images x {width} features "
              f"({' + '.join(f'{name} {size} px {w}' for name, size, w in blocks)}), {len(VIEWS)} views, "
              f"{opts.classes} classes, made in {time.perf_counter() - start:.0f} s (not timed)", flush=True)
        train, train_cpu = cli("train", "--run", str(work / "run"), *(["--head", opts.head] if opts.head else []))
        submit, submit_cpu = cli("submit", "--run", str(work / "run"), "--out", str(work / "submission.csv"))
        recipe = select_recipe(RunFolder(work / "run"))
        oof = recipe.metrics()["oof"]["ensemble"]["log_loss"]
        rows = sum(1 for _ in open(work / "submission.csv")) - 1
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)
    total = train + submit
    print(f"recipe {recipe.name}: OOF log loss {oof:.4f}; submission of {rows} rows")
    print(f"wall: train {train:.1f} s + submit {submit:.1f} s = {total:.1f} s   target <= {TARGET_SECONDS:.0f} s   "
          f"{'PASS' if total <= TARGET_SECONDS else 'FAIL'}")
    print(f"CPU (user + system): train {train_cpu:.1f} s + submit {submit_cpu:.1f} s = "
          f"{train_cpu + submit_cpu:.1f} s on {os.cpu_count()} cores")
    print(json.dumps({"n": opts.n, "classes": opts.classes, "width": width, "views": len(VIEWS),
                      "recipe": recipe.name, "train_seconds": round(train, 1), "submit_seconds": round(submit, 1),
                      "seconds": round(total, 1), "train_cpu_seconds": round(train_cpu, 1),
                      "submit_cpu_seconds": round(submit_cpu, 1), "oof_log_loss": round(oof, 4)}))


if __name__ == "__main__":
    main()

"""Quality of the head recipes on real ImageNet features: out-of-fold and hold-out scores (issue 9).

Extracts Xception features with the real weights in ../shared/weights once per data set (cached in
a run folder under --work, so a second run only trains), then trains each recipe given with
--recipes (default: the seed recipe) and prints its OOF and hold-out log loss and accuracy on:

* ../shared/data/fashion10: 10 classes of real photos; its labelled test/ is the hold-out;
* ../shared/data/dogs3 with only --per-class training images per breed (default 10).

Hold-out scores are printed, never used to choose anything. The last line is one JSON object.

    python scripts/bench_quality.py --image-size 150
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from transfer_ensemble import cli, noise, workflow  # noqa: E402
from transfer_ensemble.config import ExtractConfig  # noqa: E402
from transfer_ensemble.dataset import list_images  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def dogs_subset(source: Path, out: Path, per_class: int) -> Path:
    """A folder-layout copy of dogs3 (symbolic links) with `per_class` training images per breed."""
    if out.exists():
        return out
    for class_dir in sorted(p for p in (source / "train").iterdir() if p.is_dir()):
        target = out / "train" / class_dir.name
        target.mkdir(parents=True)
        for image in list_images(class_dir)[:per_class]:
            (target / image.name).symlink_to(image)
    (out / "test").symlink_to(source / "test")
    return out


def recipe_flags(text: str) -> list[dict]:
    """'seed;seed:epochs=100' -> one dict of train options per recipe."""
    recipes = []
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        head, _, rest = spec.partition(":")
        options = {"head": head}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            options[key.strip()] = json.loads(value)
        recipes.append(options)
    return recipes


def measure(name: str, data: Path, run: Path, extract: ExtractConfig, recipes: list[dict], folds: int) -> dict:
    start = time.perf_counter()
    workflow.extract(data, run, extract)
    extract_seconds = time.perf_counter() - start
    out = {"extract_seconds": round(extract_seconds, 1), "recipes": {}}
    for options in recipes:
        start = time.perf_counter()
        result = workflow.train(run, {"folds": folds, **options})
        metrics = result["metrics"]
        oof, hold = metrics["oof"]["ensemble"], metrics["holdout"]["ensemble"]
        out["recipes"][result["recipe"]] = {
            "oof_log_loss": round(oof["log_loss"], 4), "oof_accuracy": round(oof["accuracy"], 4),
            "holdout_log_loss": round(hold["log_loss"], 4), "holdout_accuracy": round(hold["accuracy"], 4),
            "train_seconds": round(time.perf_counter() - start, 1)}
    print(f"\n{name}: {len(recipes)} recipes (features extracted in {extract_seconds:.1f} s)")
    rows = [[recipe, r["oof_log_loss"], r["oof_accuracy"], r["holdout_log_loss"], r["holdout_accuracy"],
             f"{r['train_seconds']:.1f}"] for recipe, r in out["recipes"].items()]
    cli._print_table(rows, ["recipe", "OOF log loss", "OOF accuracy", "hold-out log loss", "hold-out accuracy",
                            "train s"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_quality", help="run folders (features are reused)")
    parser.add_argument("--weights", default=str(SHARED / "weights"))
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10, help="dogs3 training images per breed")
    parser.add_argument("--recipes", default="seed", help="';'-separated head:key=value,... (default: seed)")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for needed in (SHARED / "data" / "fashion10", SHARED / "data" / "dogs3", Path(opts.weights)):
        if not needed.exists():
            print(f"{needed} is missing: this benchmark needs ../shared beside the project", file=sys.stderr)
            return 2
    work = Path(opts.work)
    extract = ExtractConfig(backbones=("xception",), weights=opts.weights, image_size=opts.image_size)
    recipes = recipe_flags(opts.recipes)
    dogs = dogs_subset(SHARED / "data" / "dogs3", work / f"dogs3_{opts.per_class}_per_breed", opts.per_class)
    with noise.filtered_stderr():
        results = {
            "fashion10": measure("fashion10", SHARED / "data" / "fashion10", work / "fashion10_run", extract,
                                 recipes, opts.folds),
            f"dogs3_{opts.per_class}_per_breed": measure(f"dogs3, {opts.per_class} per breed", dogs,
                                                         work / f"dogs3_{opts.per_class}_run", extract, recipes,
                                                         min(opts.folds, opts.per_class)),
        }
    print(json.dumps({"image_size": opts.image_size, "backbones": ["xception"], "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

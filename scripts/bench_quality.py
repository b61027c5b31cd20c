"""Quality of the head recipes on real ImageNet features: out-of-fold and hold-out scores (issue 9).

Extracts Xception features with the real weights in ../shared/weights once per data set, at both
default scales, final and middle layer (cached in a run folder under --work, so a second run only
trains), then trains each recipe of --recipes on one run folder and prints its OOF and hold-out
log loss and accuracy on:

* ../shared/data/fashion10: 10 classes of real photos; its labelled test/ is the hold-out;
* ../shared/data/dogs3 with only --per-class training images per breed (default 10).

The default recipes climb from the paper's head (final layer only) to the default: seed; the
linear head (final and middle layers) alone on one scale, one model per view; + TTA; +
temperature; + pooled views; + the second scale (the default, `train` with no options); then the
default without each of pooling, TTA and the temperature, and a blend of the seed and the default
(weights fitted on OOF predictions). Hold-out scores are printed, never used to choose anything.
Then the view ladder (--view-rows): the same run folder extracted again with each set of views and
scales, with or without the middle layer (only the stores it lacks are computed, and timed), and
the default recipe trained on it; each row has its forward-pass pixels relative to the paper's
(image + mirror at one scale) and its OOF and hold-out scores (docs/views.md). The default
extraction is chosen on the OOF column only.
Then `scripts/bench_train.py`: the CLI's `train` + `submit` of the default recipe on a run folder
of the Kaggle dog-breed shape at the default's width (10,000 images, synthetic features, 120 classes, 5 folds).
The last line is one JSON object, with
`default_over_seed`, the default's hold-out log loss over the seed's, per data set.

    python scripts/bench_quality.py --image-size 150
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from transfer_ensemble import cli, noise, workflow  # noqa: E402
from transfer_ensemble.config import ExtractConfig, TrainConfig  # noqa: E402
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
        options = {} if head == "default" else {"head": head}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            options[key.strip()] = json.loads(value)
        recipes.append(options)
    return recipes


LADDER = ("seed;"
          "linear:multiscale=false,pool_views=false,tta=false,temperature=false;"
          "linear:multiscale=false,pool_views=false,temperature=false;"
          "linear:multiscale=false,pool_views=false;"
          "linear:multiscale=false;"
          "default;"
          "linear:pool_views=false;"
          "linear:tta=false;"
          "linear:temperature=false")


VIEW_ROWS = ("pair@1;pair@1,1.5;original,flipped,center@1,1.5;center_pair@1,1.5;pair@1,1.25,1.5;"
             "original,flipped,center@1,1.25,1.5;five_crop@1;ten_crop@1;pair@1,1.5,2")


def view_rows(text: str) -> list[tuple[str, str, bool]]:
    """'pair@1,1.5;ten_crop@1@final' -> [(views, scales, mid_layer), ...]: a third field `final`
    extracts the final layer only (--no-mid-layer)."""
    rows = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        view_set, scales, *layers = part.split("@")
        if layers not in ([], ["final"]):
            raise SystemExit(f"--view-rows: {part!r} is not VIEWS@SCALES or VIEWS@SCALES@final")
        rows.append((view_set, scales, not layers))
    return rows


def _scores(metrics: dict) -> dict:
    oof, hold = metrics["oof"]["ensemble"], metrics["holdout"]["ensemble"]
    return {"oof_log_loss": round(oof["log_loss"], 4), "oof_accuracy": round(oof["accuracy"], 4),
            "holdout_log_loss": round(hold["log_loss"], 4), "holdout_accuracy": round(hold["accuracy"], 4)}


def measure_views(name: str, data: Path, run: Path, extract: ExtractConfig, rows: list[tuple[str, str, bool]],
                  folds: int, log_file: Path | None, seed: bool = False) -> list[dict]:
    """Each (views, scales, mid_layer) row: extract what it lacks (timed), train the default recipe (and, with
    `seed`, the seed recipe on the first row), print and append the row to `log_file` as it comes."""
    from dataclasses import replace

    from transfer_ensemble import views

    out = []
    for view_set, scales, mid in rows:
        config = replace(extract, views=view_set, scales=scales, mid_layer=mid)
        start = time.perf_counter()
        workflow.extract(data, run, config)
        row = {"data": name, "views": list(config.views), "scales": list(config.scales), "mid_layer": mid,
               "pixels": round(views.pixel_cost(config.views, config.scales), 3),
               "extract_seconds": round(time.perf_counter() - start, 1)}
        for label, options in ([("seed", {"head": "seed"})] if seed and not out else []) + [("default", {})]:
            start = time.perf_counter()
            result = workflow.train(run, TrainConfig.from_json({"folds": folds, **options}).to_json())
            row[label] = {**_scores(result.metrics), "train_seconds": round(time.perf_counter() - start, 1)}
        out.append(row)
        print(f"{name} views {view_set} @ {scales}{'' if mid else ' final layer only'}: {json.dumps(row)}",
              flush=True)
        if log_file is not None:
            with open(log_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    return out


def measure(name: str, data: Path, run: Path, extract: ExtractConfig, recipes: list[dict], folds: int) -> dict:
    start = time.perf_counter()
    workflow.extract(data, run, extract)
    extract_seconds = time.perf_counter() - start
    out = {"extract_seconds": round(extract_seconds, 1), "recipes": {}}
    for options in recipes:
        start = time.perf_counter()
        # Every option explicit: a train otherwise carries over the options of the same head.
        result = workflow.train(run, TrainConfig.from_json({"folds": folds, **options}).to_json())
        if "head" not in options:
            out["default"] = result.recipe
        metrics = result.metrics
        oof, hold = metrics["oof"]["ensemble"], metrics["holdout"]["ensemble"]
        out["recipes"][result.recipe] = {
            "oof_log_loss": round(oof["log_loss"], 4), "oof_accuracy": round(oof["accuracy"], 4),
            "holdout_log_loss": round(hold["log_loss"], 4), "holdout_accuracy": round(hold["accuracy"], 4),
            "train_seconds": round(time.perf_counter() - start, 1)}
    if "seed" in out["recipes"] and "default" in out:
        start = time.perf_counter()
        blended = workflow.blend(run, ["seed", out["default"]])
        metrics = blended.metrics
        oof, hold = metrics["oof"]["ensemble"], metrics["holdout"]["ensemble"]
        out["recipes"][blended.recipe] = {
            "oof_log_loss": round(oof["log_loss"], 4), "oof_accuracy": round(oof["accuracy"], 4),
            "holdout_log_loss": round(hold["log_loss"], 4), "holdout_accuracy": round(hold["accuracy"], 4),
            "train_seconds": round(time.perf_counter() - start, 1),
            "weights": {k: round(v, 3) for k, v in metrics["weights"].items()}}
        workflow.train(run, TrainConfig.from_json({"folds": folds}).to_json())  # leave the default as last
    print(f"\n{name}: {len(recipes)} recipes (features extracted in {extract_seconds:.1f} s)")
    rows = [[recipe, r["oof_log_loss"], r["oof_accuracy"], r["holdout_log_loss"], r["holdout_accuracy"],
             f"{r['train_seconds']:.1f}"] for recipe, r in out["recipes"].items()]
    cli._print_table(rows, ["recipe", "OOF log loss", "OOF accuracy", "hold-out log loss", "hold-out accuracy",
                            "train s"])
    if "seed" in out["recipes"] and "default" in out:
        out["default_over_seed"] = round(out["recipes"][out["default"]]["holdout_log_loss"]
                                         / out["recipes"]["seed"]["holdout_log_loss"], 4)
        print(f"default ({out['default']}) over seed, hold-out log loss: {out['default_over_seed']}")
    return out


def train_submit_seconds() -> dict:
    """`scripts/bench_train.py` in its own process (it swaps the backbones for synthetic features):
    the CLI's `train` + `submit` on a run folder of the Kaggle dog-breed shape."""
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_train.py"))],
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench_train.py failed with exit code {result.returncode}")
    lines = result.stdout.strip().splitlines()
    print("\n" + "\n".join(lines[:-1]))
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_quality", help="run folders (features are reused)")
    parser.add_argument("--weights", default=str(SHARED / "weights"))
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10, help="dogs3 training images per breed")
    parser.add_argument("--recipes", default=LADDER, help="';'-separated head:key=value,...; 'default' is "
                                                           "`train` with no options (default: the ladder above)")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the train + submit timing")
    parser.add_argument("--view-rows", default=VIEW_ROWS, help="';'-separated VIEWS@SCALES rows of the view "
                                                               "ladder, VIEWS@SCALES@final without the middle "
                                                               "layer ('' leaves it out)")
    parser.add_argument("--only", choices=("fashion10", "dogs3"), help="one data set only")
    parser.add_argument("--skip-ladder", action="store_true", help="the view ladder only")
    parser.add_argument("--view-seed", action="store_true", help="also train the seed recipe on the view "
                                                                 "ladder's first row")
    parser.add_argument("--log", help="append each view-ladder row to this file as JSON, as it comes")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for needed in (SHARED / "data" / "fashion10", SHARED / "data" / "dogs3", Path(opts.weights)):
        if not needed.exists():
            print(f"{needed} is missing: this benchmark needs ../shared beside the project", file=sys.stderr)
            return 2
    work = Path(opts.work)
    extract = ExtractConfig(backbones=("xception",), weights=opts.weights, image_size=opts.image_size)
    logging.getLogger("transfer_ensemble").setLevel(logging.WARNING)
    recipes = recipe_flags(opts.recipes)
    dogs = dogs_subset(SHARED / "data" / "dogs3", work / f"dogs3_{opts.per_class}_per_breed", opts.per_class)
    sets = {"fashion10": (SHARED / "data" / "fashion10", work / "fashion10_run", opts.folds),
            f"dogs3_{opts.per_class}_per_breed": (dogs, work / f"dogs3_{opts.per_class}_run",
                                                  min(opts.folds, opts.per_class))}
    if opts.only:
        sets = {k: v for k, v in sets.items() if k.startswith(opts.only)}
    results = {}
    log_file = Path(opts.log) if opts.log else None
    with noise.filtered_stderr():
        for key, (data, run, folds) in sets.items():
            rows = view_rows(opts.view_rows)
            results[key] = {}
            if rows:
                results[key]["views"] = measure_views(key, data, run, extract, rows, folds, log_file,
                                                          opts.view_seed)
            if not opts.skip_ladder:
                results[key].update(measure(key, data, run, extract, recipes, folds))
    speed = None if opts.skip_speed else train_submit_seconds()
    print(json.dumps({"image_size": opts.image_size, "scales": list(extract.scales), "backbones": ["xception"],
                      "results": results, "train_submit": speed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

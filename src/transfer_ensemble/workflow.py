"""The three steps over a run folder: extract features, train the heads, write the submission.

Each step holds the run folder's lock, reads what earlier steps left there, and writes its own
results atomically, so any step can be killed and run again.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from transfer_ensemble import __version__, ensemble, images, submission
from transfer_ensemble.crossval import TrainConfig, oof_metrics, test_predictions, train_all
from transfer_ensemble.dataset import Dataset, Item, check_folds, empty_classes, load_dataset
from transfer_ensemble.errors import UserError
from transfer_ensemble.features import VIEWS, ExtractConfig, image_key, load_features
from transfer_ensemble.storage import disk_errors, read_json, read_json_optional, run_lock, write_json

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass
class RunData:
    """What `extract` recorded about the data: the data set, and test images left out as bad."""

    dataset: Dataset
    bad_test_ids: list[str]

    @property
    def good_test(self) -> list[Item]:
        bad = set(self.bad_test_ids)
        return [it for it in self.dataset.test if it.id not in bad]


def package_versions() -> dict:
    versions = {"python": platform.python_version(), "transfer_ensemble": __version__}
    for name in ("tensorflow", "keras", "numpy", "opencv-python-headless", "scikit-learn", "pandas"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


RUN_FILES = ("config.json", "dataset.json", "metrics.json", "bad_images.json", "image_check.json")
LOCKED_FOLDERS = ("features", "heads")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed step left in the run folder; returns them.

    Only called while holding the run folder's lock, and only where the locked steps write (their
    own files at the top, features/ and heads/), so no other process can be writing them.
    """
    candidates = [p for name in RUN_FILES for p in run_dir.glob(f".{name}.*.tmp*")]
    for folder in LOCKED_FOLDERS:
        if (run_dir / folder).is_dir():
            candidates += [p for p in (run_dir / folder).rglob(".*.tmp*") if p.is_file()]
    for path in candidates:
        path.unlink(missing_ok=True)
    if candidates:
        log.info("removed %d temporary files left by an interrupted run in %s", len(candidates), run_dir)
    return candidates


def update_config(run_dir: Path, **sections) -> dict:
    path = run_dir / "config.json"
    config = read_json(path) if path.exists() else {}
    config.update(sections)
    config["versions"] = package_versions()
    write_json(path, config)
    return config


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.exists():
        raise UserError(f"{run_dir} is not a run folder (it has no config.json). Run "
                        f"`transfer-ensemble extract --data DIR --run {run_dir}` first.")
    return read_json(path)


def _existing_run_dir(run_dir: str | Path, command: str) -> Path:
    """The run folder of `train` or `submit`: it must exist (the lock must not create it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"The run folder {run_dir} does not exist, so there is nothing to {command}. "
                        f"Check --run, or run `transfer-ensemble extract --data DIR --run {run_dir}` first.")
    return run_dir


def load_run_data(run_dir: Path) -> RunData:
    path = run_dir / "dataset.json"
    if not path.exists():
        raise UserError(f"{run_dir} has no dataset.json: run `transfer-ensemble extract` on it first.")
    obj = read_json(path)
    return RunData(Dataset.from_json(obj), obj.get("bad_test_ids", []))


def _check_images(dataset: Dataset, run_dir: Path) -> dict[str, list[tuple[Item, str]]]:
    """Decode every image once (cached by path, size and mtime); return the bad ones per split."""
    cache_path = run_dir / "image_check.json"
    cache = read_json(cache_path) if cache_path.exists() else {}
    items = [(split, it) for split in ("train", "test") for it in dataset.split(split)]
    keys = ["|".join(map(str, image_key(dataset.root, it.path))) for _, it in items]
    unknown = [i for i, k in enumerate(keys) if k not in cache]
    if unknown:
        for i, reason in zip(unknown, images.check_all([items[i][1].path for i in unknown])):
            cache[keys[i]] = reason
        write_json(cache_path, {k: cache[k] for k in keys})
    bad: dict[str, list[tuple[Item, str]]] = {"train": [], "test": []}
    for (split, it), key in zip(items, keys):
        if cache[key] is not None:
            bad[split].append((it, cache[key]))
    return bad


def _bad_image_error(bad: dict[str, list[tuple[Item, str]]]) -> UserError:
    rows = [f"  {it.path}: {reason}" for split in bad for it, reason in bad[split]]
    shown = "\n".join(rows[:50]) + (f"\n  ... and {len(rows) - 50} more" if len(rows) > 50 else "")
    return UserError(
        f"{len(rows)} images cannot be decoded (no model was built, nothing was computed):\n{shown}\n"
        f"Fix or remove them, or pass --on-bad-image skip to leave bad training images out and give "
        f"bad test images the training class frequencies in the submission."
    )


def extract(data: str | Path, run_dir: str | Path, config: ExtractConfig,
            on_bad_image: str = "error", folds: int | None = None) -> list[dict]:
    """Check every image, then compute the features of the train and test splits.

    `folds`, when training will follow (`run`), is checked against the class counts first, so a
    class too small for the folds stops the run before the long extraction rather than after.
    """
    from transfer_ensemble.features import Extractor, extract_split

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UserError(f"--on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, not {on_bad_image!r}.")
    run_dir = Path(run_dir)
    with run_lock(run_dir), disk_errors(run_dir):
        remove_stale_temporaries(run_dir)
        dataset = load_dataset(data)
        extractor = Extractor(config)
        bad = _check_images(dataset, run_dir)
        if (bad["train"] or bad["test"]) and on_bad_image == "error":
            raise _bad_image_error(bad)
        bad_train = {it.id for it, _ in bad["train"]}
        dataset.train = [it for it in dataset.train if it.id not in bad_train]
        _check_classes_left(dataset, bad["train"])
        if folds is not None:
            check_folds(dataset, folds)
        run_data = RunData(dataset, [it.id for it, _ in bad["test"]])
        if bad["train"] or bad["test"]:
            log.warning("--on-bad-image skip: left out %d bad training images%s; %d bad test images "
                        "get the training class frequencies in the submission%s. All are listed with "
                        "their reasons in %s.", len(bad["train"]), _named(bad["train"]),
                        len(bad["test"]), _named(bad["test"]), run_dir / "bad_images.json")
        write_json(run_dir / "bad_images.json",
                   {split: [{"id": it.id, "path": str(it.path), "reason": r} for it, r in bad[split]]
                    for split in bad})
        dataset_record = {**dataset.to_json(), "bad_test_ids": run_data.bad_test_ids}
        if read_json_optional(run_dir / "dataset.json") != dataset_record:
            _forget_training(run_dir)
        write_json(run_dir / "dataset.json", dataset_record)
        update_config(run_dir, data=str(dataset.root), extract=config.to_json(), on_bad_image=on_bad_image,
                      classes=dataset.classes)
        splits = {"train": dataset.train, "test": run_data.good_test}
        return [extract_split(extractor, run_dir / "features", name, items, dataset.root)
                for name, items in splits.items()]


def _forget_training(run_dir: Path) -> None:
    """The data changed: `submit` must wait for `train` (which reuses what still fits)."""
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        log.info("the data set changed since the last training: run `transfer-ensemble train` again")
        metrics.unlink()


def _named(bad: list[tuple[Item, str]], n: int = 5) -> str:
    if not bad:
        return ""
    names = ", ".join(it.path.name for it, _ in bad[:n])
    return f" ({names}{f' and {len(bad) - n} more' if len(bad) > n else ''})"


def _check_classes_left(dataset: Dataset, bad_train: list[tuple[Item, str]]) -> None:
    """After leaving bad training images out, every class must still have an image."""
    empty = empty_classes(dataset)
    if empty:
        raise UserError(
            f"After leaving out the {len(bad_train)} undecodable training images, these classes "
            f"of {dataset.root} have no training image left: {', '.join(map(repr, empty[:8]))}. "
            f"Fix or replace their images (the bad ones are listed above with the reason)."
        )


def _feature_identity(run_dir: Path, backbones: list[str]) -> dict:
    return {name: {k: v for k, v in read_json(run_dir / "features" / "train" / name / "meta.json").items()
                   if k != "ids"} for name in backbones}


def train(run_dir: str | Path, config: TrainConfig) -> dict:
    """Train 2 x K heads (skipping finished ones), write OOF predictions and metrics.json."""
    run_dir = _existing_run_dir(run_dir, "train")
    with run_lock(run_dir), disk_errors(run_dir):
        remove_stale_temporaries(run_dir)
        run_config = read_config(run_dir)
        run_data = load_run_data(run_dir)
        dataset = run_data.dataset
        check_folds(dataset, config.folds)
        names = run_config["extract"]["backbones"]
        labels = np.array([it.label for it in dataset.train], dtype=np.int64)
        good_test = run_data.good_test
        features = {view: {"train": load_features(run_dir / "features", "train", names, view,
                                                  [it.id for it in dataset.train]),
                           "test": load_features(run_dir / "features", "test", names, view,
                                                 [it.id for it in good_test])}
                    for view in VIEWS}
        update_config(run_dir, train=config.to_json())
        (run_dir / "metrics.json").unlink(missing_ok=True)  # until these heads are all trained
        heads_dir = run_dir / "heads"
        oof = train_all(heads_dir, features, labels, len(dataset.classes), config,
                        _feature_identity(run_dir, names))
        metrics = {"oof": oof_metrics(heads_dir, oof, labels, config.folds)}
        if dataset.test_is_labelled:
            metrics["holdout"] = _holdout_metrics(run_data, heads_dir, config.folds)
        write_json(run_dir / "metrics.json", metrics)
        from transfer_ensemble.report import write_report

        write_report(run_dir)
        return metrics


def _class_frequencies(run_data: RunData) -> np.ndarray:
    counts = np.bincount([it.label for it in run_data.dataset.train],
                         minlength=len(run_data.dataset.classes)).astype(np.float64)
    return counts / counts.sum()


def test_probabilities(run_data: RunData, heads_dir: Path, folds: int) -> tuple[np.ndarray, dict]:
    """The ensemble's probabilities for every test id, and each view's average on its own."""
    try:
        per_view = test_predictions(heads_dir, folds)
    except FileNotFoundError as exc:
        raise UserError(f"The fold predictions {exc.filename} are missing: training did not finish. Run "
                        f"`transfer-ensemble train --run {heads_dir.parent}` again.") from None
    n_good = len(run_data.good_test)
    if any(len(p) != n_good for preds in per_view.values() for p in preds):
        raise UserError(f"The heads in {heads_dir} predicted another test set than the {n_good} test images "
                        f"of {heads_dir.parent / 'dataset.json'}. Run `transfer-ensemble train --run "
                        f"{heads_dir.parent}` again: it reuses the fold models and predicts the new test set.")
    views = {view: ensemble.average(preds) for view, preds in per_view.items()}
    good = ensemble.average([p for preds in per_view.values() for p in preds])
    full = np.tile(_class_frequencies(run_data), (len(run_data.dataset.test), 1))
    bad = set(run_data.bad_test_ids)
    good_rows = [i for i, it in enumerate(run_data.dataset.test) if it.id not in bad]
    full[good_rows] = good
    return full, views


def _holdout_metrics(run_data: RunData, heads_dir: Path, folds: int) -> dict:
    full, views = test_probabilities(run_data, heads_dir, folds)
    labels = np.array([it.label for it in run_data.dataset.test])
    good_labels = np.array([it.label for it in run_data.good_test])
    out = {view: ensemble.score(good_labels, p) for view, p in views.items()}
    out["ensemble"] = ensemble.score(labels, full)
    return out


def submit(run_dir: str | Path, out: str | Path) -> dict:
    """Average the 2 x K test predictions into a validated submission CSV at `out`."""
    run_dir = _existing_run_dir(run_dir, "submit")
    with run_lock(run_dir), disk_errors(out):
        run_config = read_config(run_dir)
        if "train" not in run_config or not (run_dir / "metrics.json").exists():
            raise UserError(f"{run_dir} has no trained heads. Run `transfer-ensemble train --run {run_dir}` first.")
        run_data = load_run_data(run_dir)
        folds = run_config["train"]["folds"]
        probabilities, _ = test_probabilities(run_data, run_dir / "heads", folds)
        dataset = run_data.dataset
        ids = [it.id for it in dataset.test]
        if run_data.bad_test_ids:
            log.warning("%d test rows could not be predicted (their images do not decode) and get the "
                        "training class frequencies: %s. See %s.", len(run_data.bad_test_ids),
                        ", ".join(run_data.bad_test_ids[:5]) + (" ..." if len(run_data.bad_test_ids) > 5 else ""),
                        run_dir / "bad_images.json")
        frame = submission.build(ids, dataset.classes, probabilities)
        path = submission.write(frame, out, ids, dataset.classes)
        result = {"submission": str(path), "rows": len(ids), "classes": len(dataset.classes),
                  "models": 2 * folds}
        if dataset.test_is_labelled:
            result["holdout"] = ensemble.score(np.array([it.label for it in dataset.test]), probabilities)
        return result

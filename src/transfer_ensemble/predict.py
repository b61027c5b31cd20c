"""Score new images with a trained run: the run's backbones and fold heads, averaged as `submit` does.

``Run.load(run_dir)`` reads the run's configuration, checks that the backbone weights found now
are the ones its features were extracted with, and loads the 2 x K fold models once.
``Run.predict(images)`` then scores image paths or RGB uint8 arrays.

Paths go through the same on-disk feature store as ``extract`` (``features.extract_split``), in
``RUN/predict/<hash of the image list>/``: memory stays flat whatever the number of images, a
progress bar shows, and a killed prediction resumes where it stopped. Scoring the same list
again reuses the stored features.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import numpy as np
import pandas as pd

from transfer_ensemble import ensemble, features, images
from transfer_ensemble.dataset import IMAGE_EXTENSIONS, Item, list_images
from transfer_ensemble.errors import UserError
from transfer_ensemble.storage import atomic_path, read_json, run_lock, write_json

log = logging.getLogger(__name__)

FORMATS = ("probabilities", "top-k")
PATH_COLUMNS = ("path", "image", "file", "filepath")
SCORE_CHUNK = 4096
SPLIT = "predict"


@dataclass
class Run:
    """A trained run folder, ready to score images: its backbones, classes and fold models."""

    run_dir: Path
    classes: list[str]
    folds: int
    extract_config: features.ExtractConfig
    models: dict[str, list] = field(repr=False)
    extractor: features.Extractor = field(repr=False)

    @classmethod
    def load(cls, run_dir: str | Path, weights: str | None = None) -> "Run":
        """Read a trained run; `weights` (imagenet, random or a folder) defaults to the run's own.

        Raises UserError when the weights found now differ from those the run was trained on.
        """
        run_dir = Path(run_dir)
        config = _read_run_config(run_dir)
        saved = config["extract"]
        if weights is None and saved["weights"] not in ("imagenet", "random") \
                and not Path(saved["weights"]).expanduser().is_dir():
            raise UserError(f"The run {run_dir} was extracted with the weights in {saved['weights']}, which "
                            f"is no longer a folder. Pass --weights with a folder holding the same weight "
                            f"files (they are checked against the run's).")
        extract_config = features.ExtractConfig(
            backbones=tuple(saved["backbones"]), weights=weights or saved["weights"],
            image_size=saved.get("image_size"), batch_size=saved.get("batch_size", 32),
            precision=saved.get("precision", "float32"), seed=saved.get("seed", 0))
        extractor = features.Extractor(extract_config)
        _check_feature_identity(run_dir, extractor, weights_given=weights is not None)
        folds = int(config["train"]["folds"])
        classes = list(read_json(run_dir / "dataset.json")["classes"])
        return cls(run_dir, classes, folds, extract_config, _load_models(run_dir, folds), extractor)

    @property
    def n_models(self) -> int:
        return sum(len(m) for m in self.models.values())

    def predict(self, images_or_paths: Sequence[str | os.PathLike | np.ndarray] | np.ndarray,
                tta: bool = True, batch_size: int | None = None,
                cache_dir: str | Path | None = None) -> np.ndarray:
        """Class probabilities (images, classes) in the order of `self.classes`.

        Each item is an image path or an RGB uint8 array (height, width, 3); a 4-d uint8 array
        is a batch of them. With `tta` (the default) the original and the flipped view's fold
        models are averaged, as in the submission; without it, the original view's only.
        Paths use the on-disk feature store (`cache_dir`, default RUN/predict/<hash>/), arrays
        are scored in memory.
        """
        items = list(images_or_paths) if not isinstance(images_or_paths, np.ndarray) \
            else list(images_or_paths) if images_or_paths.ndim == 4 else [images_or_paths]
        if not items:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        if any(isinstance(it, np.ndarray) for it in items):
            return self._predict_in_memory(items, tta, batch_size)
        paths = [Path(p).expanduser().resolve() for p in items]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{len(missing)} images do not exist: {_first_few(missing)}.")
        stores, _ = self.extract(paths, batch_size, cache_dir)
        return np.concatenate([p for _, p in self.iter_probabilities(stores, len(paths), tta)])

    def extract(self, paths: Sequence[Path], batch_size: int | None = None,
                cache_dir: str | Path | None = None) -> tuple[list[Path], dict]:
        """Compute the missing backbone features of `paths` (absolute); returns the store folders."""
        cache = Path(cache_dir) if cache_dir is not None else cache_folder(self.run_dir, paths)
        extractor = self._extractor(batch_size)
        items = [Item(str(i), p) for i, p in enumerate(paths)]
        with run_lock(cache):
            for stale in cache.rglob(".*.tmp*"):
                stale.unlink(missing_ok=True)
            write_json(cache / "images.json", [str(p) for p in paths])
            stats = features.extract_split(extractor, cache / "features", SPLIT, items, Path("/"))
        return [cache / "features" / SPLIT / spec.name for spec in extractor.specs], stats

    def iter_probabilities(self, stores: Sequence[Path], n: int, tta: bool = True,
                           chunk: int = SCORE_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, probabilities) for consecutive chunks of the stored features."""
        views = features.VIEWS if tta else features.VIEWS[:1]
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            x = {view: np.concatenate([_read_rows(folder / f"{view}.npy", start, stop) for folder in stores],
                                      axis=1) for view in views}
            yield start, self._score(x)

    def _score(self, x: dict[str, np.ndarray]) -> np.ndarray:
        from transfer_ensemble import heads

        predictions = [heads.predict(model, x[view]) for view in x for model in self.models[view]]
        return ensemble.average(predictions)

    def _extractor(self, batch_size: int | None) -> features.Extractor:
        if batch_size is None or batch_size == self.extract_config.batch_size:
            return self.extractor
        extractor = copy.copy(self.extractor)
        extractor.config = replace(self.extract_config, batch_size=batch_size)
        return extractor

    def _predict_in_memory(self, items: list, tta: bool, batch_size: int | None) -> np.ndarray:
        extractor = self.extractor
        extractor.ensure_weights_known()
        batch_size = batch_size or self.extract_config.batch_size
        views = features.VIEWS if tta else features.VIEWS[:1]
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            parts: dict[str, list[np.ndarray]] = {view: [] for view in views}
            for spec in extractor.specs:
                size = self.extract_config.size_of(spec)
                pixels = np.stack([_as_model_input(it, size, start + i) for i, it in enumerate(chunk)])
                both = extractor.forward(spec, np.concatenate([pixels, pixels[:, :, ::-1]]))
                parts["original"].append(both[:len(chunk)])
                if tta:
                    parts["flipped"].append(both[len(chunk):])
            out.append(self._score({view: np.concatenate(p, axis=1) for view, p in parts.items()}))
        return np.concatenate(out)


def cache_folder(run_dir: str | Path, paths: Sequence[Path]) -> Path:
    """Where the features of this list of absolute image paths are kept: one folder per list."""
    digest = hashlib.sha256(json.dumps([str(p) for p in paths]).encode()).hexdigest()[:16]
    return Path(run_dir) / "predict" / digest


def _read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a stored feature array, mapped only while they are copied out."""
    array = np.load(path, mmap_mode="r")
    rows = np.array(array[start:stop], dtype=np.float32)
    del array
    return rows


def _as_model_input(item, size: int, index: int) -> np.ndarray:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise UserError(f"Image {index} is an array of shape {item.shape} and type {item.dtype}; "
                            f"pass RGB uint8 arrays of shape (height, width, 3), or image paths.")
        return images.resize(item, size)
    try:
        return images.load(item, size)
    except images.ImageReadError as exc:
        raise UserError(f"The image {item} {exc}.") from None


def _read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.exists():
        raise UserError(f"{run_dir} is not a run folder (it has no config.json). Pass --run with the "
                        f"folder that `transfer-ensemble train` (or `run`) wrote.")
    config = read_json(path)
    if "extract" not in config or "train" not in config or not (run_dir / "dataset.json").exists():
        raise UserError(f"{run_dir} has no trained heads. Run `transfer-ensemble train --run {run_dir}` first.")
    return config


def _training_meta(run_dir: Path, name: str) -> dict:
    for split in ("train", "test"):
        path = run_dir / "features" / split / name / "meta.json"
        if path.exists():
            return {k: v for k, v in read_json(path).items() if k != "ids"}
    raise UserError(f"{run_dir} has no record of the {name} features its heads were trained on "
                    f"(features/train/{name}/meta.json is missing), so the weights cannot be checked. "
                    f"Run `transfer-ensemble extract` on it again, or score with the run that has them.")


def _check_feature_identity(run_dir: Path, extractor: features.Extractor, weights_given: bool) -> None:
    """Refuse weights, image size, precision or preprocessing other than the training run's."""
    trained = {spec.name: _training_meta(run_dir, spec.name) for spec in extractor.specs}
    extractor.ensure_weights_known()
    for spec in extractor.specs:
        now = features._store_meta(spec, extractor.sources[spec.name], extractor.config, [])
        now.pop("ids")
        then = trained[spec.name]
        if now["weights"] != then["weights"]:
            asked = (f"--weights {extractor.config.weights}" if weights_given
                     else f"the run's own --weights {extractor.config.weights}")
            raise UserError(
                f"The {spec.name} weights found now ({asked}, identity {now['weights']}) are not the "
                f"ones the run {run_dir} was trained on (identity {then['weights']}). Its heads only "
                f"make sense on features from those weights. Pass --weights with the weights the run "
                f"was extracted with (see 'extract' in {run_dir / 'config.json'}), or train a new run "
                f"with these weights.")
        differing = sorted(k for k in now if k in then and now[k] != then[k])
        if differing:
            detail = ", ".join(f"{k}: {then[k]!r} then, {now[k]!r} now" for k in differing)
            raise UserError(f"The {spec.name} features would not be computed as in the run {run_dir} "
                            f"({detail}). Score with the transfer-ensemble version that trained the run, "
                            f"or train a new run.")


def _load_models(run_dir: Path, folds: int) -> dict[str, list]:
    import keras

    models: dict[str, list] = {}
    for view in features.VIEWS:
        models[view] = []
        for fold in range(folds):
            path = run_dir / "heads" / view / f"fold{fold}" / "model.keras"
            if not path.exists() or not (path.parent / "done.json").exists():
                raise UserError(f"The fold model {path} is missing or unfinished. Run `transfer-ensemble "
                                f"train --run {run_dir}` to finish training first.")
            models[view].append(keras.saving.load_model(path))
    return models


def _first_few(values: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def find_images(source: str | Path) -> tuple[list[Path], list[str]]:
    """The images named by a folder (recursively) or a CSV: absolute paths and the names to write."""
    source = Path(source).expanduser()
    if source.is_dir():
        root = source.resolve()
        paths = list_images(root, recursive=True)
        if not paths:
            raise UserError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                            f"in it or its subfolders.")
        return paths, [str(p.relative_to(root)) for p in paths]
    if source.is_file():
        return _images_from_csv(source)
    raise UserError(f"--images {source} does not exist. Pass a folder of images or a CSV with a "
                    f"column of image paths.")


def _images_from_csv(path: Path) -> tuple[list[Path], list[str]]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}). Pass a folder of images or a CSV "
                        f"with a header and one image path per row.") from None
    if frame.empty or not len(frame.columns):
        raise UserError(f"{path} has no rows: it must have a header and one image path per row.")
    by_name = {str(c).strip().lower(): c for c in frame.columns}
    column = next((by_name[c] for c in PATH_COLUMNS if c in by_name), frame.columns[0])
    names = [str(v).strip() for v in frame[column]]
    base = path.resolve().parent
    paths = [(base / Path(v).expanduser()).resolve() for v in names]
    empty = [str(i + 2) for i, v in enumerate(names) if not v]
    if empty:
        raise UserError(f"{path}: the {column!r} column is empty on lines {_first_few(empty)}.")
    missing = [v for v, p in zip(names, paths) if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images named in the {column!r} column of {path} do not exist "
                        f"(relative paths are read from {base}): {_first_few(missing)}.")
    return paths, names


def check_images(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Decode every image once; the ones that fail, with the reason."""
    return [(path, reason) for path, reason in zip(paths, images.check_all(paths)) if reason is not None]


def _bad_images_error(bad: list[tuple[Path, str]]) -> UserError:
    rows = [f"  {path}: {reason}" for path, reason in bad]
    shown = "\n".join(rows[:50]) + (f"\n  ... and {len(rows) - 50} more" if len(rows) > 50 else "")
    return UserError(f"{len(rows)} images cannot be decoded (nothing was scored):\n{shown}\n"
                     f"Fix or remove them (or leave them out of the CSV) and run the same command again.")


def _header(fmt: str, classes: Sequence[str], k: int) -> list[str]:
    if fmt == "probabilities":
        return ["image", *classes]
    return ["image"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")]


def _rows(fmt: str, names: Sequence[str], probabilities: np.ndarray, classes: Sequence[str],
          k: int) -> Iterator[list]:
    if fmt == "probabilities":
        for name, row in zip(names, probabilities):
            yield [name, *(f"{v:.8g}" for v in row)]
        return
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    for name, row, best in zip(names, probabilities, order):
        yield [name] + [v for c in best for v in (classes[c], f"{row[c]:.8g}")]


def _write_csv(f: TextIO, fmt: str, names: Sequence[str], chunks: Iterator[tuple[int, np.ndarray]],
               classes: Sequence[str], k: int) -> dict[str, int]:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(_header(fmt, classes, k))
    top = np.zeros(len(classes), dtype=np.int64)
    for start, probabilities in chunks:
        writer.writerows(_rows(fmt, names[start:start + len(probabilities)], probabilities, classes, k))
        top += np.bincount(probabilities.argmax(axis=1), minlength=len(classes))
    return {classes[c]: int(top[c]) for c in np.argsort(-top, kind="stable") if top[c]}


def predict_to_csv(run_dir: str | Path, source: str | Path, out: str | Path, fmt: str = "probabilities",
                   k: int = 5, tta: bool = True, batch_size: int | None = None,
                   weights: str | None = None) -> dict:
    """Score the images of a folder or CSV with a trained run and write `out` atomically."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    _read_run_config(Path(run_dir))
    paths, names = find_images(source)
    bad = check_images(paths)
    if bad:
        raise _bad_images_error(bad)
    run = Run.load(run_dir, weights=weights)
    if fmt == "top-k" and k > len(run.classes):
        log.info("--k %d is more than the %d classes: writing all %d", k, len(run.classes), len(run.classes))
        k = len(run.classes)
    start = time.perf_counter()
    stores, stats = run.extract(paths, batch_size)
    out = Path(out)
    with atomic_path(out, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        predicted = _write_csv(f, fmt, names, run.iter_probabilities(stores, len(paths), tta),
                               run.classes, k)
    return {"out": str(out), "images": len(paths), "classes": len(run.classes), "format": fmt, "k": k,
            "models": run.n_models if tta else len(run.models["original"]), "tta": tta,
            "computed": stats["computed"], "reused": stats["reused"],
            "extract_seconds": stats["seconds"], "seconds": time.perf_counter() - start,
            "cache": str(stores[0].parent.parent.parent), "predicted": predicted}

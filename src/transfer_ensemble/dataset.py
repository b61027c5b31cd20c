"""Find the images, labels, classes and test ids of a competition data folder.

Two layouts are read:

* Kaggle: ``labels.csv`` (``id`` then a label column), ``train/<id>.<ext>``,
  ``test/<id>.<ext>`` and ``sample_submission.csv`` (``id`` then one column per class).
  Classes and their order, and the test ids and their order, come from the sample submission.
* Folders: ``train/<class>/<file>`` (plus ``validation/<class>/<file>``, merged into training),
  and ``test/`` either flat or made of class folders (a labelled hold-out).
"""

from __future__ import annotations

import csv
import errno
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from transfer_ensemble.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif",
                              ".avif", ".jp2", ".pbm", ".pgm", ".ppm", ".pnm", ".sr", ".ras"})
"""The extensions of the formats this OpenCV build decodes; other files are listed as not used."""


@dataclass(frozen=True)
class Item:
    """One image: its id (a submission row or a training example), file and label index."""

    id: str
    path: Path
    label: int | None = None


@dataclass
class Dataset:
    root: Path
    layout: str
    classes: list[str]
    train: list[Item]
    test: list[Item]
    warnings: list[str] = field(default_factory=list)
    id_column: str = "id"  # the sample submission's id header, as written there

    @property
    def test_is_labelled(self) -> bool:
        return bool(self.test) and all(item.label is not None for item in self.test)

    def split(self, name: str) -> list[Item]:
        return {"train": self.train, "test": self.test}[name]

    def describe(self) -> str:
        """The layout found and what it holds, in words, e.g. for `extract`'s log."""
        layout = ("the Kaggle layout (labels.csv, train/, test/, sample_submission.csv)" if self.layout == "kaggle"
                  else "the folder layout (train/<class>/, test/)")
        test = "a labelled hold-out" if self.test_is_labelled else "to submit"
        return (f"{self.root} is in {layout}: {len(self.train)} training images of {len(self.classes)} classes, "
                f"{len(self.test)} test images ({test})")

    def to_json(self) -> dict:
        def rows(items: list[Item]) -> list[dict]:
            return [
                {"id": it.id, "path": str(it.path.relative_to(self.root)), "label": it.label}
                for it in items
            ]

        return {
            "root": str(self.root),
            "layout": self.layout,
            "id_column": self.id_column,
            "classes": self.classes,
            "train": rows(self.train),
            "test": rows(self.test),
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Dataset":
        root = Path(obj["root"])

        def items(rows: list[dict]) -> list[Item]:
            return [Item(r["id"], root / r["path"], r["label"]) for r in rows]

        return cls(root, obj["layout"], list(obj["classes"]), items(obj["train"]), items(obj["test"]),
                   id_column=obj.get("id_column", "id"))


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if is_image(p))


def why_not_used(path: Path) -> str | None:
    """Why a file found where images are read is not used; None for an image that is."""
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link that loops"
        return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    if path.name.startswith("."):
        return "is hidden (its name starts with a dot)"
    if path.is_dir():
        return "is a folder"
    if not path.is_file():
        return "is not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return (f"has an extension ({path.suffix or 'none'}) of no image format OpenCV reads "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return None


def unused_files(folder: Path, folders_used: bool = False) -> list[tuple[Path, str]]:
    """Entries of `folder` that are not read as images, with the reason; subfolders only when
    they are not read themselves (`folders_used` false)."""
    out = []
    for path in sorted(folder.iterdir()):
        if folders_used and path.is_dir() and not path.is_symlink():
            continue
        why = why_not_used(path)
        if why is not None:
            out.append((path, why))
    return out


def _unused_warning(folder: Path, unused: list[tuple[Path, str]], n: int = 10) -> list[str]:
    if not unused:
        return []
    listed = "; ".join(f"{path.name} {why}" for path, why in unused[:n])
    more = f"; and {len(unused) - n} more" if len(unused) > n else ""
    return [f"{len(unused)} files in {folder} are not used: {listed}{more}."]


def load_dataset(root: str | Path) -> Dataset:
    """Read either layout and check it: ids, images and classes agree, no split or class is empty."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"The data folder {root} does not exist. Pass --data with the folder that "
                        f"holds train/ and test/ (and labels.csv for the Kaggle layout).")
    if (root / "labels.csv").exists():
        dataset = _load_kaggle(root)
    elif (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        dataset = _load_folders(root)
    elif (root / "sample_submission.csv").exists() or \
            ((root / "train").is_dir() and list_images(root / "train")):
        raise UserError(
            f"{root / 'labels.csv'} is missing. {root} looks like the Kaggle layout (a "
            f"sample_submission.csv or images directly in train/), which needs labels.csv with a "
            f"header 'id,<label column>' and one row per training image train/<id>.jpg."
        )
    else:
        raise UserError(
            f"{root} is not a data folder this tool reads: it has no labels.csv, and no "
            f"train/<class>/ folders. Use the Kaggle layout (labels.csv with id and label columns, "
            f"train/<id>.jpg, test/<id>.jpg, sample_submission.csv) or the folder layout "
            f"(train/<class>/<image>, and a test/ folder)."
        )
    _check_non_empty(dataset)
    _check_every_class_has_images(dataset)
    _check_two_classes(dataset)
    for message in dataset.warnings:
        log.warning(message)
    return dataset


def _images_by_stem(folder: Path) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    clashes = []
    for path in list_images(folder):
        if path.stem in by_stem:
            clashes.append(f"{by_stem[path.stem].name} and {path.name}")
        by_stem[path.stem] = path
    if clashes:
        raise UserError(
            f"{folder} holds several images with the same id (file name without extension): "
            f"{', '.join(clashes[:5])}. Each id must name one image: remove or rename the extra files."
        )
    return by_stem


def _first_few(values, n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def _read_csv(path: Path, what: str) -> tuple[pd.DataFrame, str]:
    """The CSV with its id column renamed to ``id``, and that column's header as written."""
    if not path.exists():
        raise UserError(f"{path} is missing. The Kaggle layout needs {what}.")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}). Fix: {what}.") from None
    dupes = _duplicates(header)
    if dupes:
        raise UserError(f"The header of {path} names the same column more than once: {_first_few(dupes)}. "
                        f"Each column must appear once: remove or rename the duplicates.")
    id_columns = [c for c in frame.columns if c.strip().lower() == "id"]
    if not id_columns:
        raise UserError(
            f"{path} has no 'id' column (its columns are {list(frame.columns)[:6]}). Its first "
            f"line must be a header starting with id: {what}."
        )
    return frame.rename(columns={id_columns[0]: "id"}), id_columns[0]


def _duplicates(values) -> list[str]:
    return [v for v, n in Counter(values).items() if n > 1]


def _load_kaggle(root: Path) -> Dataset:
    labels, _ = _read_csv(root / "labels.csv", "a header 'id,<label column>' and one row per training image")
    label_columns = [c for c in labels.columns if c != "id"]
    if not label_columns:
        raise UserError(f"{root / 'labels.csv'} has an id column but no label column after it. "
                        f"Add the class of each image as a second column, e.g. 'id,breed'.")
    label_column = label_columns[0]
    ignored = f" (the other columns, {_first_few(label_columns[1:])}, are ignored)" if label_columns[1:] else ""
    log.info("labels: the %r column of %s%s", label_column, root / "labels.csv", ignored)
    if labels.empty:
        raise UserError(f"The train set of {root} is empty: {root / 'labels.csv'} has a header but no "
                        f"rows. Add one row 'id,<class>' per training image in {root / 'train'}.")
    dupes = _duplicates(labels["id"])
    if dupes:
        raise UserError(f"{root / 'labels.csv'} names the same id more than once: {_first_few(dupes)}. "
                        f"Each training image must appear once: remove the duplicate rows.")

    sample_path = root / "sample_submission.csv"
    sample, id_column = _read_csv(sample_path, "a header 'id,<class 1>,<class 2>,...' and one row per test image")
    classes = [c for c in sample.columns if c != "id"]
    if not classes:
        raise UserError(f"{sample_path} has no class columns after id; the class list and order come from it.")

    label_classes = set(labels[label_column])
    missing_in_sample = sorted(label_classes - set(classes))
    missing_in_labels = sorted(set(classes) - label_classes)
    if missing_in_sample or missing_in_labels:
        parts = []
        if missing_in_sample:
            parts.append(f"classes in labels.csv but not in sample_submission.csv: {_first_few(missing_in_sample)}")
        if missing_in_labels:
            parts.append(f"classes in sample_submission.csv with no training image: {_first_few(missing_in_labels)}")
        raise UserError(
            f"The classes of {root / 'labels.csv'} and {sample_path} differ ({'; '.join(parts)}). "
            f"Both files must use exactly the same class names (spelling and case included)."
        )

    class_index = {c: i for i, c in enumerate(classes)}
    train_images = _images_by_stem(root / "train") if (root / "train").is_dir() else {}
    test_images = _images_by_stem(root / "test") if (root / "test").is_dir() else {}

    missing = [i for i in labels["id"] if _strip_ext(i) not in train_images]
    if missing:
        raise UserError(
            f"{len(missing)} ids of {root / 'labels.csv'} have no image in {root / 'train'}: "
            f"{_first_few(missing)}. Add the images, or remove their rows from labels.csv."
        )
    train = [Item(i, train_images[_strip_ext(i)], class_index[c])
             for i, c in zip(labels["id"], labels[label_column])]

    warnings = []
    unlabelled = sorted(set(train_images) - {_strip_ext(i) for i in labels["id"]})
    if unlabelled:
        warnings.append(f"{len(unlabelled)} images in {root / 'train'} are not named in labels.csv and "
                        f"are not used: {_first_few(unlabelled)}.")

    sample_ids = list(sample["id"])
    dupes = _duplicates(sample_ids)
    if dupes:
        raise UserError(f"{sample_path} names the same id more than once: {_first_few(dupes)}. "
                        f"Each test image must have one row.")
    no_image = [i for i in sample_ids if _strip_ext(i) not in test_images]
    no_row = sorted(set(test_images) - {_strip_ext(i) for i in sample_ids})
    if no_image or no_row:
        raise UserError(
            f"The ids of {sample_path} ({len(sample_ids)}) and the images in {root / 'test'} "
            f"({len(test_images)}) differ: {len(no_image)} ids have no image"
            + (f" ({_first_few(no_image)})" if no_image else "")
            + f", {len(no_row)} images have no row"
            + (f" ({_first_few(no_row)})" if no_row else "")
            + ". The submission needs one row per test image: make the two match."
        )
    test = [Item(i, test_images[_strip_ext(i)]) for i in sample_ids]
    for folder in (root / "train", root / "test"):
        if folder.is_dir():
            warnings += _unused_warning(folder, unused_files(folder))
    return Dataset(root, "kaggle", classes, train, test, warnings, id_column=id_column)


def _strip_ext(image_id: str) -> str:
    path = Path(image_id)
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else image_id


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_folders(root: Path) -> Dataset:
    train_dir = root / "train"
    classes = [p.name for p in _class_folders(train_dir)]
    class_index = {c: i for i, c in enumerate(classes)}
    warnings = []
    train = []
    for split in ("train", "validation"):
        folder = root / split
        if not folder.is_dir():
            continue
        for class_dir in _class_folders(folder):
            if class_dir.name not in class_index:
                raise UserError(f"{class_dir} is a class that {train_dir} does not have. The classes "
                                f"come from train/: add a train/{class_dir.name}/ folder or remove this one.")
            for path in list_images(class_dir):
                train.append(Item(str(path.relative_to(root)), path, class_index[class_dir.name]))
            warnings += _unused_warning(class_dir, unused_files(class_dir))
        stray = list_images(folder)
        if stray:
            warnings.append(f"{len(stray)} images lie directly in {folder} rather than in a class "
                            f"folder and are not used: {_first_few(p.name for p in stray)}.")
        warnings += _unused_warning(folder, [(p, why) for p, why in unused_files(folder, folders_used=True)])

    test_dir = root / "test"
    test: list[Item] = []
    if test_dir.is_dir():
        flat = list_images(test_dir)
        test_classes = [d for d in _class_folders(test_dir) if not flat or list_images(d)]
        if test_classes and flat:
            raise UserError(
                f"{test_dir} holds both images ({_first_few(p.name for p in flat)}) and folders of "
                f"images ({_first_few(p.name for p in test_classes)}). A flat test/ holds only images "
                f"(the submission rows); a labelled test/ holds only class folders. Move the images "
                f"into their class folders, or the folders' images up into {test_dir}."
            )
        if test_classes:
            for class_dir in test_classes:
                if class_dir.name not in class_index:
                    raise UserError(f"{class_dir} is a class that {train_dir} does not have. A labelled "
                                    f"test/ must use the training classes.")
                test += [Item(p.stem, p, class_index[class_dir.name]) for p in list_images(class_dir)]
                warnings += _unused_warning(class_dir, unused_files(class_dir))
            dupes = _duplicates(it.id for it in test)
            if dupes:
                raise UserError(f"Test images in different class folders of {test_dir} share a file name "
                                f"(the submission id): {_first_few(dupes)}. Rename them so ids are unique.")
            test.sort(key=lambda it: it.id)
        else:
            test = [Item(stem, path) for stem, path in sorted(_images_by_stem(test_dir).items())]
            warnings += _unused_warning(test_dir, unused_files(test_dir))
    return Dataset(root, "folders", classes, train, test, warnings)


def _check_non_empty(dataset: Dataset) -> None:
    for name in ("train", "test"):
        if not dataset.split(name):
            raise UserError(
                f"The {name} set of {dataset.root} is empty: no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) were found in {dataset.root / name}. Check the "
                f"--data folder and its layout."
            )


def empty_classes(dataset: Dataset) -> list[str]:
    """The classes with no training image."""
    counts = Counter(item.label for item in dataset.train)
    return [c for i, c in enumerate(dataset.classes) if counts.get(i, 0) == 0]


def _check_every_class_has_images(dataset: Dataset) -> None:
    empty = empty_classes(dataset)
    if empty:
        raise UserError(
            f"Some classes of {dataset.root} have no training image: "
            f"{', '.join(repr(c) for c in empty[:8])}. Add images to them or remove those classes."
        )


def _check_two_classes(dataset: Dataset) -> None:
    """The heads tell classes apart: a data set of one class has nothing to learn."""
    if len(dataset.classes) < 2:
        found = f"one class, {dataset.classes[0]!r}" if dataset.classes else "no class"
        where = "the labels of labels.csv" if dataset.layout == "kaggle" else "the folders of train/"
        raise UserError(f"{dataset.root} has {found} ({where}): a classifier needs two or more classes. "
                        f"Add the images of the other classes, or check the label column.")


def check_folds(dataset: Dataset, folds: int) -> None:
    """Stratified K-fold needs every class in every fold: at least `folds` images per class."""
    if folds < 2:
        raise UserError(f"--folds must be at least 2, not {folds}.")
    counts = Counter(it.label for it in dataset.train)
    small = [(dataset.classes[c], counts.get(c, 0)) for c in range(len(dataset.classes))
             if counts.get(c, 0) < folds]
    if small:
        fewest = min(n for _, n in small)
        fix = f"--folds {fewest} or lower would work" if fewest >= 2 else "each class needs 2 or more images"
        listed = ", ".join(f"{name!r} ({n} images)" for name, n in small[:8])
        raise UserError(f"Stratified {folds}-fold cross-validation needs at least {folds} training "
                        f"images per class; these classes of {dataset.root} have fewer: {listed}. "
                        f"Add images, or {fix}.")

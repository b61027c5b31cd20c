"""A small synthetic data set in the Kaggle layout: four visually distinct classes of shapes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from transfer_ensemble.errors import UserError
from transfer_ensemble.storage import write_atomic

CLASSES = ("blue_triangle", "green_square", "red_circle", "yellow_stripes")


def draw(class_name: str, rng: np.random.Generator, width: int = 160, height: int = 120) -> np.ndarray:
    """One RGB image of `class_name`: a coloured shape at a random place on a noisy background."""
    image = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 3)
    jitter = lambda rgb: tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in rgb)
    cx, cy = int(rng.integers(40, width - 40)), int(rng.integers(35, height - 35))
    r = int(rng.integers(18, 32))
    if class_name == "red_circle":
        cv2.circle(image, (cx, cy), r, jitter((220, 30, 30)), -1)
    elif class_name == "green_square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), jitter((30, 200, 40)), -1)
    elif class_name == "blue_triangle":
        points = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], dtype=np.int32)
        cv2.fillPoly(image, [points], jitter((30, 40, 220)))
    elif class_name == "yellow_stripes":
        color = jitter((230, 220, 30))
        for x in range(int(rng.integers(0, 12)), width, 24):
            cv2.rectangle(image, (x, 0), (x + 10, height), color, -1)
    else:
        raise ValueError(f"unknown demo class {class_name!r}")
    return image


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    write_atomic(path, lambda tmp: tmp.write_bytes(data.tobytes()), suffix=".jpg")


def write_demo_data(out: str | Path, train_per_class: int = 30, test_per_class: int = 10,
                    seed: int = 0) -> dict:
    """Write labels.csv, train/, test/ and sample_submission.csv (uniform probabilities) to `out`.

    `out` must not exist or be empty: the demo never mixes its images into other data.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise UserError(f"{out} {what}: the demo data set is written only to a new or empty folder, so that "
                        f"it never overwrites or mixes into other data. Pass --out with a new folder.")
    rng = np.random.default_rng(seed)
    labels, test_ids = [], []
    for name in CLASSES:
        for _ in range(train_per_class):
            image_id = f"{rng.integers(16 ** 11):011x}"
            _save_jpeg(out / "train" / f"{image_id}.jpg", draw(name, rng))
            labels.append((image_id, name))
        for _ in range(test_per_class):
            image_id = f"{rng.integers(16 ** 11):011x}"
            _save_jpeg(out / "test" / f"{image_id}.jpg", draw(name, rng))
            test_ids.append(image_id)
    labels_frame = pd.DataFrame(labels, columns=["id", "breed"])
    write_atomic(out / "labels.csv", lambda tmp: labels_frame.to_csv(tmp, index=False), suffix=".csv")
    test_ids = sorted(test_ids)
    sample = pd.DataFrame({"id": test_ids, **{c: 1 / len(CLASSES) for c in CLASSES}})
    write_atomic(out / "sample_submission.csv", lambda tmp: sample.to_csv(tmp, index=False), suffix=".csv")
    return {"train": len(labels), "test": len(test_ids), "classes": list(CLASSES)}

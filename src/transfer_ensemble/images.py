"""Read images with OpenCV into RGB uint8 arrays of one size, check them, and stream batches.

Decoding uses ``cv2.imdecode`` on the file's bytes, so paths with spaces or non-ASCII letters
work. EXIF orientation is applied (OpenCV's default) for training, test and prediction alike;
grayscale and palette images become 3 channels, alpha is dropped, 16-bit is scaled to 8-bit.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

cv2.setNumThreads(1)

JPEG_MAGIC = b"\xff\xd8"
JPEG_END = b"\xff\xd9"


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message says why."""


def decode(path: str | Path) -> np.ndarray:
    """Decode `path` to an RGB uint8 array of shape (height, width, 3)."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot be read ({exc.strerror})") from None
    if data.size == 0:
        raise ImageReadError("is empty (0 bytes)")
    raw = data.tobytes()
    if raw[:2] == JPEG_MAGIC and JPEG_END not in raw[-64 * 1024:]:
        raise ImageReadError("is a truncated JPEG (no end-of-image marker)")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)
    if image is None or image.size == 0:
        raise ImageReadError("is not an image OpenCV can decode (unknown format or corrupt data)")
    return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking, bilinear when enlarging."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    shrinking = h * w > size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def load(path: str | Path, size: int) -> np.ndarray:
    """The model input for one image: RGB uint8, size x size x 3."""
    return resize(decode(path), size)


def check(path: str | Path) -> str | None:
    """None when the image decodes, else the reason it does not."""
    try:
        decode(path)
    except ImageReadError as exc:
        return str(exc)
    return None


@dataclass
class Batch:
    """A batch of decoded images and the row each one goes to."""

    rows: np.ndarray
    pixels: np.ndarray


def iter_batches(paths: Sequence[Path], rows: Sequence[int], size: int, batch_size: int,
                 workers: int = 2, prefetch: int = 4) -> Iterator[Batch]:
    """Decode ``paths[r]`` for each row r in `rows`, in order, in background threads.

    At most `prefetch` batches wait in memory, so memory is flat whatever the number of images.
    OpenCV releases the GIL, so decoding runs alongside the model's forward pass.
    """
    rows = np.asarray(rows, dtype=np.int64)
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    pixels = np.stack(list(pool.map(lambda r: load(paths[r], size), chunk)))
                    _put(Batch(chunk, pixels))
        except BaseException as exc:
            _put(exc)
        _put(None)

    def _put(item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, name="image-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)

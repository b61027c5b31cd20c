"""Read images with OpenCV into RGB uint8 arrays of one size, check them, and stream batches.

Decoding uses ``cv2.imdecode`` on the file's bytes, so paths with spaces or non-ASCII letters
work. What every image becomes, the same for training, test and prediction:

* EXIF orientation is applied: a JPEG whose EXIF Orientation tag says "rotate 90" is decoded
  already rotated, as photo viewers show it (OpenCV's default for ``IMREAD_COLOR_RGB``; the
  ``IMREAD_IGNORE_ORIENTATION`` flag is never used). A portrait phone photo is therefore taller
  than wide, in training and at test time alike.
* Grayscale and palette images become 3 identical or looked-up RGB channels; alpha is dropped
  (the colour channels are kept as stored, not blended onto a background).
* 16-bit images are scaled to 8 bits (the value divided by 256); CMYK JPEGs are converted to RGB;
  floating-point TIFFs are read as 0 black, 1 white.
* Any size from 1x1 up to `max_pixels` (read from the header of every format OpenCV decodes
  here, checked after decoding for any other) is read; large images cost their full decode once
  (10000 x 10000 pixels: about 300 MB while decoding) and are then area-resized.

A file that does not decode (empty, truncated, not an image, a format OpenCV cannot read)
raises ImageReadError whose message says which of these it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import queue
import re
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import cv2
import numpy as np

from transfer_ensemble.config import MAX_PIXELS

cv2.setNumThreads(1)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

JPEG_MAGIC = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
JPEG_SOS = 0xDA
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})

# Signatures of formats OpenCV decodes: a file that starts with one yet fails is corrupt.
DECODABLE_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
# Signatures of files OpenCV cannot decode, with what they are.
UNSUPPORTED_SIGNATURES = {
    b"%PDF": "a PDF document",
    b"\x00\x00\x01\x00": "an ICO icon",
    b"8BPS": "a Photoshop PSD file",
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive",
    b"<svg": "an SVG drawing",
    b"<?xml": "an XML (possibly SVG) file",
    b"<!DOCTYPE html": "an HTML page",
    b"<html": "an HTML page",
}


DECODE_BUDGET_PIXELS = 1 << 28
"""Pixels that all decoding threads together may hold at once (about 0.8 GB as RGB)."""


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message says why."""


class ImageTooLarge(ImageReadError):
    """An image whose header declares more pixels than the cap (a decompression bomb, say)."""


class PixelBudget:
    """Bounds the pixels being decoded at once across threads; one image alone is always let in."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.pixels)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


DECODE_BUDGET = PixelBudget(DECODE_BUDGET_PIXELS)


HEADER_BYTES = 65536
"""How much of a file (given as an array) is read for its header; a TIFF's directory is read where it is."""
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SUN_RASTER_MAGIC = b"\x59\xa6\x6a\x95"
JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
J2K_MAGIC = b"\xff\x4f\xff\x51"


def header_size(raw: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) from the header of any format OpenCV decodes here (PNG, JPEG, GIF, BMP, WebP,
    TIFF, PNM/PAM/PFM, Sun raster, Radiance HDR, JPEG 2000, AVIF), without decoding; else None.

    `raw` is the file's bytes, or its uint8 array, of which only the first `HEADER_BYTES` and
    a TIFF's first image directory are read."""
    if not isinstance(raw, bytes):
        if bytes(raw[:4]) in TIFF_MAGIC:
            return _tiff_size(raw)
        raw = bytes(raw[:HEADER_BYTES])
    if raw[:4] in TIFF_MAGIC:
        return _tiff_size(raw)
    return _other_size(raw)


def _other_size(raw: bytes) -> tuple[int, int] | None:
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
        return struct.unpack(">II", raw[16:24])
    if raw[:4] in (b"GIF8",) and len(raw) >= 10:
        return struct.unpack("<HH", raw[6:10])
    if raw[:2] == b"BM" and len(raw) >= 26:
        width, height = struct.unpack("<ii", raw[18:26])
        return abs(width), abs(height)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" and len(raw) >= 30:
        chunk = raw[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", raw[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(raw[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if raw[:2] == JPEG_MAGIC:
        return _jpeg_size(raw)
    if raw[:4] == SUN_RASTER_MAGIC and len(raw) >= 12:
        return struct.unpack(">II", raw[4:12])
    if raw[:12] == JP2_MAGIC:
        at = raw.find(b"ihdr")
        return struct.unpack(">II", raw[at + 4:at + 12])[::-1] if at > 0 and len(raw) >= at + 12 else None
    if raw[:4] == J2K_MAGIC and len(raw) >= 24:
        width, height, x0, y0 = struct.unpack(">IIII", raw[8:24])
        return width - x0, height - y0
    if raw[4:8] == b"ftyp":
        return _isobmff_size(raw)
    if raw[:2] in (b"PF", b"Pf") or (raw[:1] == b"P" and raw[1:2] in b"123456"):
        return _pnm_size(raw)
    if raw[:3] == b"P7\n":
        return _pam_size(raw)
    if raw[:10] == b"#?RADIANCE" or raw[:6] == b"#?RGBE":
        return _hdr_size(raw)
    return None


def _tiff_size(raw: bytes | np.ndarray) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of a TIFF's (or BigTIFF's) first image directory."""
    order = "<" if bytes(raw[:2]) == b"II" else ">"
    big = bytes(raw[2:4]) in (b"+\x00", b"\x00+")
    try:
        if big:
            (start,) = struct.unpack(order + "Q", bytes(raw[8:16]))
            (count,) = struct.unpack(order + "Q", bytes(raw[start:start + 8]))
            entry, first, fmt = 20, start + 8, "HHQ8s"
        else:
            (start,) = struct.unpack(order + "I", bytes(raw[4:8]))
            (count,) = struct.unpack(order + "H", bytes(raw[start:start + 2]))
            entry, first, fmt = 12, start + 2, "HHI4s"
        found = {}
        table = bytes(raw[first:first + entry * min(count, 4096)])
        for at in range(0, len(table) - entry + 1, entry):
            tag, kind, _, value = struct.unpack(order + fmt, table[at:at + entry])
            if tag in (256, 257):
                found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
    except struct.error:
        return None
    return (found[256], found[257]) if len(found) == 2 else None


def _isobmff_size(raw: bytes) -> tuple[int, int] | None:
    """The largest image extent ('ispe' property) an AVIF/HEIF file declares."""
    sizes, at = [], raw.find(b"ispe")
    while at > 0 and len(raw) >= at + 16:
        sizes.append(struct.unpack(">II", raw[at + 8:at + 16]))
        at = raw.find(b"ispe", at + 4)
    return max(sizes, key=lambda size: size[0] * size[1]) if sizes else None


def _pnm_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height of a PBM/PGM/PPM (P1 to P6) or PFM header: whitespace-separated, # comments."""
    text = re.sub(rb"#[^\n]*", b" ", raw[2:512])
    numbers = re.match(rb"\s+(\d+)\s+(\d+)", text)
    return (int(numbers[1]), int(numbers[2])) if numbers else None


def _pam_size(raw: bytes) -> tuple[int, int] | None:
    """WIDTH and HEIGHT of a PAM (P7) header."""
    header = raw[:raw.find(b"ENDHDR")] if b"ENDHDR" in raw[:4096] else raw[:4096]
    width, height = re.search(rb"\bWIDTH\s+(\d+)", header), re.search(rb"\bHEIGHT\s+(\d+)", header)
    return (int(width[1]), int(height[1])) if width and height else None


def _hdr_size(raw: bytes) -> tuple[int, int] | None:
    """The resolution line after a Radiance HDR header, e.g. ``-Y 480 +X 640``."""
    line = re.search(rb"\n\n([-+])([XY]) (\d+) ([-+])([XY]) (\d+)", raw[:4096])
    if not line:
        return None
    first, second = int(line[3]), int(line[6])
    return (second, first) if line[2] == b"Y" else (first, second)


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    """The frame size of the first start-of-frame segment."""
    pos = 2
    while pos + 9 <= len(raw):
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in JPEG_SOF:
            height, width = struct.unpack(">HH", raw[pos + 5:pos + 9])
            return width, height
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:
            pos += 2
            continue
        if marker == JPEG_SOS:
            return None
        pos += 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
    return None


def check_pixels(raw: bytes | np.ndarray, max_pixels: int = MAX_PIXELS) -> int:
    """The pixels the header declares (0 if unknown); ImageTooLarge above `max_pixels`."""
    size = header_size(raw)
    if size is None:
        return 0
    _check_size(*size, max_pixels)
    return size[0] * size[1]


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(f"is {width} x {height} pixels ({width * height:,}), more than the limit of "
                            f"{max_pixels:,} (--max-pixels): a decompression bomb, or a scan far larger "
                            f"than any model input. Shrink it, or raise --max-pixels if it is genuine")


def read_bytes(path: str | Path) -> np.ndarray:
    """The file's bytes as a uint8 array; ImageReadError when it cannot be read."""
    try:
        return np.fromfile(Path(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot be read ({exc.strerror})") from None


def content_hash(data: np.ndarray) -> str:
    """SHA-256 of a file's bytes: what identifies an image everywhere features are cached."""
    return hashlib.sha256(memoryview(data)).hexdigest()


def decode(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode `path` to an RGB uint8 array of shape (height, width, 3)."""
    return decode_bytes(read_bytes(path), max_pixels)


def decode_bytes(data: np.ndarray, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file's bytes (uint8 array) to RGB uint8 (height, width, 3).

    Images declaring more than `max_pixels` are refused before decoding, and any image decoded
    larger (a format whose header is not read) right after; decodes in all threads together hold
    at most `DECODE_BUDGET` pixels (one larger image, or one of unknown size, decodes alone).
    """
    if data.size == 0:
        raise ImageReadError("is empty (0 bytes)")
    raw = data.tobytes()
    pixels = check_pixels(raw, max_pixels)
    if raw[:2] == JPEG_MAGIC and _jpeg_truncated(raw):
        raise ImageReadError("is a truncated JPEG (the image data stops before its end-of-image marker)")
    try:
        with DECODE_BUDGET.hold(pixels or DECODE_BUDGET.pixels):
            image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)
        if image is None and raw[:4] in TIFF_MAGIC:
            with DECODE_BUDGET.hold(8 * (pixels or DECODE_BUDGET.pixels)):  # up to 8 bytes a sample
                image = _decode_wide_tiff(data)
    except cv2.error as exc:
        detail = str(exc).strip().splitlines()[-1]
        if "MAX_IMAGE_PIXELS" in detail or "validateInputImageSize" in detail:
            raise ImageTooLarge("is larger than OpenCV decodes (more than 2^30 pixels, or a side over "
                                "2^20): shrink it") from None
        raise ImageReadError(f"cannot be decoded by OpenCV ({detail})") from None
    if image is None or image.size == 0:
        raise ImageReadError(_why_undecodable(raw))
    _check_size(image.shape[1], image.shape[0], max_pixels)
    return image


def _decode_wide_tiff(data: np.ndarray) -> np.ndarray | None:
    """A TIFF of samples libtiff's RGBA reader refuses, as RGB uint8: floating point (0 black, 1
    white, as OpenCV scales float images) decoded; other sample types named. None when it does
    not decode at all."""
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype.kind != "f" or channels not in (1, 3, 4):
        raise ImageReadError(f"is a TIFF of {channels} channel(s) of {image.dtype} samples, which is not decoded: "
                             f"save it with 8- or 16-bit integer or floating-point samples, as gray, RGB or RGBA")
    pixels = (np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0) * 255).round().astype(np.uint8)
    code = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}[channels]
    return cv2.cvtColor(pixels, code)


def _jpeg_truncated(raw: bytes) -> bool:
    """True when no end-of-image marker follows the first start-of-scan.

    Walking the marker segments to the scan skips an EXIF thumbnail, whose own end-of-image
    marker would otherwise hide a truncated main image. Inside the scan 0xFF is always followed
    by 0x00 or a restart marker, so the first 0xFFD9 after it is the real end.
    """
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return False  # not a marker where one must be: leave the verdict to the decoder
        marker = raw[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == JPEG_SOS:
            return raw.find(JPEG_END, pos) == -1
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:
            pos += 2
            continue
        pos += 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
    return True


def _why_undecodable(raw: bytes) -> str:
    head = raw[:64]
    if raw[:2] == JPEG_MAGIC:
        return "is a corrupt JPEG (OpenCV cannot decode its data)"
    for signature, name in DECODABLE_SIGNATURES.items():
        if head.startswith(signature):
            return f"is a corrupt or truncated {name} file (OpenCV cannot decode its data)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "is a corrupt or truncated WebP file (OpenCV cannot decode its data)"
    if head[4:8] == b"ftyp":
        return (f"is a {head[8:12].decode('ascii', 'replace')!r} ISO media file (HEIC/AVIF or video), "
                f"which this OpenCV build does not decode: convert it to JPEG or PNG")
    stripped = head.lstrip()
    for signature, name in UNSUPPORTED_SIGNATURES.items():
        if stripped.startswith(signature):
            return f"is {name}, not an image OpenCV can decode"
    if _looks_like_text(raw[:4096]):
        start = raw[:40].decode("utf-8", "replace").strip().splitlines()[0] if raw.strip() else ""
        return f"is a text file, not an image (it starts with {start!r})"
    return "is not in an image format OpenCV can decode (unknown format or corrupt data)"


def _looks_like_text(sample: bytes) -> bool:
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def resize(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking, bilinear when enlarging; into `out`
    (a C-contiguous uint8 array of that shape) when given."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        if out is None:
            return image
        out[...] = image
        return out
    shrinking = h * w > size * size
    return cv2.resize(image, (size, size), dst=out,
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def load(path: str | Path, size: int, max_pixels: int = MAX_PIXELS, out: np.ndarray | None = None) -> np.ndarray:
    """The model input for one image: RGB uint8, size x size x 3 (written into `out` when given)."""
    return resize(decode(path, max_pixels), size, out)


@dataclass(frozen=True)
class Inspection:
    """One image file: the SHA-256 of its bytes (None if unreadable) and why it does not decode.

    `cacheable` is false for a verdict that depends on the pixel cap rather than on the bytes.
    """

    sha256: str | None
    reason: str | None
    cacheable: bool = True


def inspect(path: str | Path, known: Mapping[str, str | None] | None = None,
            max_pixels: int = MAX_PIXELS) -> Inspection:
    """Read `path` once: hash its bytes, and decode it unless `known` already has the verdict."""
    try:
        data = read_bytes(path)
    except ImageReadError as exc:
        return Inspection(None, str(exc))
    digest = content_hash(data)
    try:
        check_pixels(data, max_pixels)
    except ImageTooLarge as exc:
        return Inspection(digest, str(exc), cacheable=False)
    if known is not None and digest in known:
        return Inspection(digest, known[digest])
    try:
        decode_bytes(data, max_pixels)
    except ImageTooLarge as exc:
        return Inspection(digest, str(exc), cacheable=False)
    except ImageReadError as exc:
        return Inspection(digest, str(exc))
    return Inspection(digest, None)


def listing(bad: Sequence[tuple[Path, str]], limit: int = 50) -> str:
    """Undecodable images, one indented line each with its reason; at most `limit`, then a count."""
    rows = [f"  {path}: {reason}" for path, reason in bad]
    return "\n".join(rows[:limit]) + (f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else "")


def default_workers() -> int:
    """Decoding threads: one per CPU core this process may use, at least 2.

    A GPU runs both backbones at over a thousand images a second, far more than two cores
    decode, so decoding must use every core there; on a CPU the bounded prefetch queue keeps
    the extra threads idle once the model falls behind.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, cores)


def check(path: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """None when the image decodes, else the reason it does not."""
    return inspect(path, max_pixels=max_pixels).reason


def inspect_all(paths: Sequence[Path], known: Mapping[str, str | None] | None = None,
                max_pixels: int = MAX_PIXELS) -> list[Inspection]:
    """`inspect` every path on all cores, with a progress bar; results in `paths`' order.

    `known` maps content hashes to verdicts from an earlier check: those images are hashed but not
    decoded again, so a second check of unchanged images costs one read each.
    """
    from transfer_ensemble import progress

    results = []
    with ThreadPoolExecutor(max_workers=default_workers()) as pool, \
            progress.bar(total=len(paths), desc="check images", unit="img") as bar:
        for result in pool.map(lambda p: inspect(p, known, max_pixels), paths):
            results.append(result)
            bar.update()
    return results


@dataclass
class Batch:
    """A batch of decoded images and the row each one goes to."""

    rows: np.ndarray
    pixels: np.ndarray


def iter_batches(paths: Sequence[Path], rows: Sequence[int], size: int, batch_size: int,
                 workers: int | None = None, prefetch: int = 4,
                 max_pixels: int = MAX_PIXELS) -> Iterator[Batch]:
    """Decode ``paths[r]`` for each row r in `rows`, in order, in background threads.

    `workers` threads (default: `default_workers()`) decode up to `prefetch` batches ahead,
    across batch boundaries, and at most `prefetch` finished batches wait in memory, so memory
    is flat whatever the number of images. OpenCV releases the GIL, so decoding runs alongside
    the model's forward pass. Each thread resizes its image straight into its batch's array, so
    no one thread copies whole batches (stacking them in one thread held the 16 cores of an
    H200 machine to 1,711 images/s of 500x375 JPEGs; filling in place gave 2,595).
    """
    rows = np.asarray(rows, dtype=np.int64)
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    buffers: dict[int, np.ndarray] = {}

    def fill(position: int) -> None:
        """Decode the image at `position` of `rows` into its batch's array."""
        k, slot = divmod(position, batch_size)
        load(paths[rows[position]], size, max_pixels, buffers[k][slot])

    def produce() -> None:
        try:
            pool = ThreadPoolExecutor(max_workers=workers or default_workers())
            ahead = iter(range(len(rows)))
            pending: deque[Future] = deque()
            try:
                for k, chunk in enumerate(chunks):
                    if stop.is_set():
                        return
                    for position in itertools.islice(ahead, prefetch * batch_size - len(pending)):
                        j = position // batch_size
                        if j not in buffers:
                            buffers[j] = np.empty((len(chunks[j]), size, size, 3), dtype=np.uint8)
                        pending.append(pool.submit(fill, position))
                    for _ in chunk:
                        pending.popleft().result()
                    _put(Batch(chunk, buffers.pop(k)))
            finally:
                pool.shutdown(cancel_futures=True)
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

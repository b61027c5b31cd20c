"""Unusual but valid images decode to RGB uint8; undecodable ones are all reported before any model.

Every file is generated here (the one truncated real photo comes from ../shared when present).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image  # a dependency of matplotlib, which requirements.txt names

from conftest import FAST_TRAIN, TINY, draw, make_kaggle, run_cli, save_rgb
from transfer_ensemble import cli, images

RED = (230, 20, 10)


def write_bgr(path: Path, array: np.ndarray, ext: str = ".png") -> Path:
    ok, data = cv2.imencode(ext, array)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def app1_exif(orientation: int, thumbnail: bytes = b"") -> bytes:
    """An APP1 segment with a big-endian TIFF header and one IFD entry: Orientation (0x0112).

    With `thumbnail`, its JPEG bytes follow the IFD, as cameras embed a preview image.
    """
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + thumbnail
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def with_exif(jpeg: bytes, orientation: int, thumbnail: bytes = b"") -> bytes:
    return jpeg[:2] + app1_exif(orientation, thumbnail) + jpeg[2:]


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


# ---- decodable, unusual -------------------------------------------------------------------

def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = noise((7, 9))
    image = images.decode(write_bgr(tmp_path / "gray.png", gray))
    assert image.shape == (7, 9, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], gray)


def test_alpha_is_dropped_and_colours_kept(tmp_path: Path) -> None:
    bgra = np.zeros((5, 6, 4), np.uint8)
    bgra[..., :3] = RED[::-1]
    bgra[..., 3] = np.arange(6, dtype=np.uint8) * 50  # from fully transparent to opaque
    image = images.decode(write_bgr(tmp_path / "rgba.png", bgra))
    assert image.shape == (5, 6, 3)
    assert (image == RED).all(), "the colour channels must be kept as stored, not blended"


def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    bgr16 = np.zeros((4, 5, 3), np.uint16)
    bgr16[..., 2] = 65535      # red: full scale
    bgr16[..., 1] = 257 * 100  # green: 100 in 8 bits
    bgr16[..., 0] = 0
    image = images.decode(write_bgr(tmp_path / "deep.png", bgr16))
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert (image == (255, 100, 0)).all()
    gray16 = np.full((3, 3), 257 * 50, np.uint16)
    assert (images.decode(write_bgr(tmp_path / "deep_gray.png", gray16)) == 50).all()


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = images.decode(path)
    assert image.shape == (6, 8, 3)
    red, green, blue = (image[..., c].astype(int) for c in range(3))
    assert (red > 230).all() and (green < 25).all() and (blue < 25).all()


@pytest.mark.parametrize("orientation, shape, red_part", [
    (1, (20, 40), (slice(None), slice(0, 20))),   # as stored: left half red
    (3, (20, 40), (slice(None), slice(20, 40))),  # rotated 180: right half red
    (6, (40, 20), (slice(0, 20), slice(None))),   # rotated 90 clockwise: top half red
    (8, (40, 20), (slice(20, 40), slice(None))),  # rotated 90 counter-clockwise: bottom half red
])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, shape: tuple[int, int],
                                     red_part: tuple[slice, slice]) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = RED
    path = tmp_path / f"exif{orientation}.jpg"
    path.write_bytes(with_exif(jpeg_bytes(stored), orientation))
    image = images.decode(path)
    assert image.shape[:2] == shape
    mask = np.zeros(shape, bool)
    mask[red_part] = True
    assert image[mask][:, 0].min() > 180 and image[~mask][:, 0].max() < 60
    assert images.load(path, TINY).shape == (TINY, TINY, 3)


def test_palette_png_is_looked_up(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    palette.save(path)
    assert Image.open(path).mode == "P"
    assert (images.decode(path) == RED).all()


def test_one_pixel_image(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    assert images.decode(path).tolist() == [[[1, 2, 3]]]
    loaded = images.load(path, TINY)
    assert loaded.shape == (TINY, TINY, 3) and (loaded == (1, 2, 3)).all()


def test_huge_image_decodes_in_reasonable_time_and_memory(tmp_path: Path) -> None:
    """10000 x 10000 pixels: decoded once (300 MB), then area-resized; measured in a fresh process."""
    side = 10_000
    big = np.zeros((side, side, 3), np.uint8)
    big[:, : side // 2] = RED[::-1]
    path = write_bgr(tmp_path / "huge.jpg", big, ".jpg")
    del big
    script = (
        "import resource, sys, time; from transfer_ensemble import images\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "before = peak(); t = time.perf_counter()\n"
        "reason = images.check(sys.argv[1]); x = images.load(sys.argv[1], 75)\n"
        "print(reason, x.shape, time.perf_counter() - t, peak() - before, *x[0, 0], *x[0, -1])"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("None (75, 75, 3) "), out
    *_, seconds, extra_mb, r0, g0, b0, r1, g1, b1 = out.split()
    seconds, extra_mb = float(seconds), int(extra_mb)
    np.testing.assert_allclose([int(v) for v in (r0, g0, b0)], RED, atol=3)
    assert max(int(r1), int(g1), int(b1)) <= 3
    print(f"10000x10000 JPEG: check + load took {seconds:.1f} s, peak memory +{extra_mb} MB")
    assert seconds < 30
    assert extra_mb < 1200, "a full decode is 300 MB; more than 4x that means extra copies"


@pytest.mark.parametrize("name", ["my dog.jpg", "chien brun é ü.jpg", "犬 1.jpg", "Ñandú – x.png"])
def test_names_with_spaces_and_non_ascii_letters(tmp_path: Path, name: str) -> None:
    path = tmp_path / "sub folder é" / name
    save_rgb(path, draw(0, np.random.default_rng(0)))
    assert images.check(path) is None
    assert images.decode(path).shape == (48, 48, 3)


def test_content_decides_not_the_extension(tmp_path: Path) -> None:
    gif = tmp_path / "really_a_gif.webp"
    Image.new("RGB", (6, 4), RED).save(gif, format="GIF")
    assert images.decode(gif).shape == (4, 6, 3)


def _encoded(fmt: str, side: tuple[int, int] = (64, 48)) -> bytes:
    """A `side` (width, height) image in `fmt`: by OpenCV where it writes the format, else by Pillow."""
    width, height = side
    pillow = {"bigtiff": ("TIFF", {"big_tiff": True}), "j2k": ("JPEG2000", {"no_jp2": True})}
    if fmt in pillow:
        import io

        buffer = io.BytesIO()
        name, options = pillow[fmt]
        Image.new("RGB", side, RED).save(buffer, format=name, **options)
        return buffer.getvalue()
    pixels = noise((height, width) if fmt in (".pgm", ".pbm") else (height, width, 3))
    if fmt in (".pfm", ".hdr"):
        pixels = pixels.astype(np.float32) / 255
    ok, data = cv2.imencode(fmt, pixels, [cv2.IMWRITE_TIFF_COMPRESSION, 8] if fmt == ".tiff" else [])
    assert ok, fmt
    return data.tobytes()


SIZED_FORMATS = [".png", ".jpg", ".gif", ".bmp", ".webp", ".tiff", "bigtiff", ".ppm", ".pgm", ".pbm", ".pam",
                 ".pfm", ".hdr", ".ras", ".jp2", "j2k", ".avif"]


@pytest.mark.parametrize("fmt", SIZED_FORMATS)
def test_every_format_opencv_decodes_declares_its_size_before_decoding(fmt: str) -> None:
    data = _encoded(fmt)
    assert images.header_size(data) == (64, 48)
    assert images.header_size(np.frombuffer(data, np.uint8)) == (64, 48)
    assert images.decode_bytes(np.frombuffer(data, np.uint8)).shape == (48, 64, 3)


@pytest.mark.parametrize("fmt", [".tiff", ".ppm", ".pgm", ".ras", ".hdr"])
def test_max_pixels_refuses_every_format_before_decoding(tmp_path: Path, fmt: str, monkeypatch) -> None:
    path = tmp_path / f"wide{fmt}"
    path.write_bytes(_encoded(fmt, (2000, 600)))
    monkeypatch.setattr(cv2, "imdecode", lambda *args: pytest.fail("decoded an image over the cap"))
    reason = images.check(path, max_pixels=1_000_000)
    assert reason.startswith("is 2000 x 600 pixels (1,200,000), more than the limit of 1,000,000"), reason
    with pytest.raises(images.ImageTooLarge):
        images.load(path, TINY, max_pixels=1_000_000)


def test_an_image_of_unknown_header_is_checked_after_decoding_and_decodes_alone(tmp_path: Path,
                                                                               monkeypatch) -> None:
    path = write_bgr(tmp_path / "a.png", noise((40, 50, 3)))
    monkeypatch.setattr(images, "header_size", lambda raw: None)  # as for a format whose header is not read
    held = []
    hold = images.DECODE_BUDGET.hold
    monkeypatch.setattr(images.DECODE_BUDGET, "hold", lambda pixels: held.append(pixels) or hold(pixels))
    assert images.check(path, max_pixels=1000) == ("is 50 x 40 pixels (2,000), more than the limit of 1,000 "
                                                   "(--max-pixels): a decompression bomb, or a scan far larger "
                                                   "than any model input. Shrink it, or raise --max-pixels if "
                                                   "it is genuine")
    assert held == [images.DECODE_BUDGET.pixels]
    verdict = images.inspect(path, max_pixels=1000)
    assert not verdict.cacheable, "a verdict of the cap must not be cached with the image's bytes"


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_floating_point_tiff_decodes(tmp_path: Path, channels: int) -> None:
    values = np.zeros((6, 8, channels), np.float32)
    values[..., :min(channels, 3)] = [0.0, 0.5, 1.0][:min(channels, 3)] if channels > 1 else 0.5
    values[0, 0, 0] = 7.0  # out of range: clipped to white
    path = write_bgr(tmp_path / "float.tiff", values[..., 0] if channels == 1 else values, ".tiff")
    assert images.check(path) is None
    rgb = images.decode(path)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    expected = [128, 128, 128] if channels == 1 else [255, 128, 0]  # stored BGR(A), returned RGB
    assert rgb[1, 1].tolist() == expected


def test_a_tiff_of_32_bit_integers_is_named_not_called_corrupt(tmp_path: Path) -> None:
    path = write_bgr(tmp_path / "int.tiff", np.ones((6, 8, 3), np.int32), ".tiff")
    reason = images.check(path)
    assert reason.startswith("is a TIFF of 3 channel(s) of int32 samples, which is not decoded"), reason


# ---- undecodable ---------------------------------------------------------------------------

def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert images.check(path) == "is empty (0 bytes)"


def test_truncated_generated_jpeg(tmp_path: Path) -> None:
    data = jpeg_bytes(noise((64, 64, 3)))
    for cut in (len(data) // 2, len(data) - 2):
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        assert "truncated JPEG" in images.check(path)
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data + b"trailing bytes after the end marker")
    assert images.check(whole) is None


def test_truncated_jpeg_with_exif_thumbnail(tmp_path: Path) -> None:
    """The thumbnail's own end-of-image marker must not hide the truncated main image."""
    thumbnail = jpeg_bytes(noise((8, 8, 3), seed=1))
    data = with_exif(jpeg_bytes(noise((64, 64, 3))), 1, thumbnail)
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data)
    assert images.check(whole) is None
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert "truncated JPEG" in images.check(cut)


def test_truncated_real_photo(tmp_path: Path, dogs3: Path) -> None:
    photo = sorted(dogs3.rglob("*.jpg"))[0]
    data = photo.read_bytes()
    assert images.check(photo) is None
    path = tmp_path / "cut photo.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated JPEG" in images.check(path)


def test_text_with_an_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("id,breed\nabc,beagle\n")
    assert images.check(path) == "is a text file, not an image (it starts with 'id,breed')"


def test_truncated_png(tmp_path: Path) -> None:
    data = write_bgr(tmp_path / "ok.png", noise((32, 32, 3))).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert images.check(path).startswith("is a corrupt or truncated PNG file")


@pytest.mark.parametrize("fmt, what", [("ICO", "is an ICO icon"), ("PDF", "is a PDF document"),
                                       ("PCX", "is not in an image format OpenCV can decode")])
def test_unsupported_format(tmp_path: Path, fmt: str, what: str) -> None:
    path = tmp_path / "odd.webp"
    Image.new("RGB", (16, 16), RED).save(path, format=fmt)
    reason = images.check(path)
    assert reason.startswith(what)
    with pytest.raises(images.ImageReadError):
        images.load(path, TINY)


# ---- the CLI: one check pass, all bad images at once ---------------------------------------

def add_bad_images(data: Path) -> dict[str, str]:
    """Replace some Kaggle images by bad files; returns {file name: expected reason fragment}."""
    (data / "train" / "tr0_0.png").write_text("this is not a picture")
    (data / "train" / "tr1_2.png").write_bytes(b"")
    test_jpeg = jpeg_bytes(draw(1, np.random.default_rng(5)))
    (data / "test" / "te01.png").unlink()
    (data / "test" / "te01.jpg").write_bytes(test_jpeg[: len(test_jpeg) // 2])
    Image.new("RGB", (16, 16)).save(data / "test" / "te03.png", format="ICO")
    return {"tr0_0.png": "is a text file", "tr1_2.png": "is empty", "te01.jpg": "is a truncated JPEG",
            "te03.png": "is an ICO icon"}


@pytest.mark.slow
def test_extract_lists_every_bad_image_before_building_a_model(tmp_path: Path) -> None:
    data = make_kaggle(tmp_path / "data")
    expected = add_bad_images(data)
    run = tmp_path / "run"
    script = ("import sys; from transfer_ensemble.cli import main; code = main(sys.argv[1:]); "
              "print('tensorflow imported:', 'tensorflow' in sys.modules); sys.exit(code)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, "extract", "--data", str(data), "--run", str(run),
                             "--weights", "random", "--image-size", str(TINY), "--scales", "1"],
                            capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "tensorflow imported: False" in result.stdout
    assert f"{len(expected)} images cannot be decoded" in result.stderr
    for name, reason in expected.items():
        line = next(line for line in result.stderr.splitlines()
                    if line.strip().startswith(str(data)) and name in line)
        assert reason in line
    assert "--on-bad-image skip" in result.stderr
    assert not (run / "features").exists()
    assert seconds < 30, f"the check took {seconds:.1f} s; it must not wait for a model"


@pytest.mark.slow
def test_skip_leaves_bad_train_images_out_and_gives_bad_test_rows_class_frequencies(tmp_path: Path) -> None:
    data = make_kaggle(tmp_path / "data", per_class=4, n_test=5)
    expected = add_bad_images(data)
    odd_name = "café au lait 1"
    save_rgb(data / "test" / f"{odd_name}.jpg", draw(2, np.random.default_rng(9)))
    sample = pd.read_csv(data / "sample_submission.csv")
    sample = pd.concat([sample, sample.iloc[:1].assign(id=odd_name)], ignore_index=True)
    sample.to_csv(data / "sample_submission.csv", index=False)
    run, out = tmp_path / "run", tmp_path / "sub.csv"

    result = run_cli("run", "--data", str(data), "--run", str(run), "--out", str(out), "--on-bad-image", "skip",
                     "--backbones", "xception", "--weights", "random", "--image-size", str(TINY), "--scales", "1", *FAST_TRAIN)
    assert result.returncode == 0, result.stderr
    assert "left out 2 bad training images (tr0_0.png, tr1_2.png)" in result.stderr
    assert "2 bad test images" in result.stderr and "te01.jpg" in result.stderr and "te03.png" in result.stderr

    listed = json.loads((run / "bad_images.json").read_text())
    assert sorted(r["id"] for r in listed["train"]) == ["tr0_0", "tr1_2"]
    assert sorted(r["id"] for r in listed["test"]) == ["te01", "te03"]
    for row in listed["train"] + listed["test"]:
        assert expected[Path(row["path"]).name] in row["reason"]

    train_ids = json.loads((run / "features" / "train" / "xception" / "meta.json").read_text())["ids"]
    assert len(train_ids) == 10 and "tr0_0" not in train_ids and "tr1_2" not in train_ids

    frame = pd.read_csv(out)
    assert list(frame["id"]) == list(sample["id"])
    classes = list(frame.columns[1:])
    frequencies = {"class_0": 3 / 10, "class_1": 3 / 10, "class_2": 4 / 10}
    for bad_id in ("te01", "te03"):
        row = frame.set_index("id").loc[bad_id]
        np.testing.assert_allclose([row[c] for c in classes], [frequencies[c] for c in classes], atol=1e-7)
    good = frame[~frame["id"].isin(["te01", "te03"])].set_index("id")
    assert not np.allclose(good[classes].to_numpy(), [frequencies[c] for c in classes], atol=1e-7)
    np.testing.assert_allclose(frame[classes].sum(axis=1), 1, atol=1e-6)
    assert odd_name in set(frame["id"])


def test_skip_refuses_when_a_class_has_no_good_image_left(tmp_path: Path, capsys) -> None:
    data = make_kaggle(tmp_path / "data", per_class=2)
    for i in range(2):
        (data / "train" / f"tr1_{i}.png").write_bytes(b"")
    code = cli.main(["extract", "--data", str(data), "--run", str(tmp_path / "run"), "--on-bad-image", "skip",
                     "--weights", "random", "--image-size", str(TINY), "--scales", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"After leaving out the 2 bad training images (--on-bad-image skip), these classes of {data} "
            f"have no training image left: 'class_1'.") in err
    assert str(data / "train" / "tr1_0.png") in err
    assert not (tmp_path / "run" / "features").exists()

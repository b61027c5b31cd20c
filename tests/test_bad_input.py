"""Bad input answered, nothing clobbered, nothing silently dropped (issue 12).

These run in this process and stop before any model is built, or replace the extraction with a
stand-in that computes nothing, so they are fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import draw, make_folders, make_kaggle, save_rgb
from transfer_ensemble import cli, features, submission
from transfer_ensemble.dataset import load_dataset

EXTRACT = ["--weights", "random", "--image-size", "75", "--backbones", "xception"]


def refused(capsys, *args: str) -> str:
    """Run the CLI in-process; assert exit 2 and one paragraph without a traceback; return it."""
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = err.split("error: ", 1)[1]
    assert message.count("\n") == 1, f"not one paragraph: {message!r}"
    return message


@pytest.fixture
def no_extraction(monkeypatch):
    """Replace the forward passes with nothing: extract records its data set without a model."""
    monkeypatch.setattr(features, "extract_split",
                        lambda extractor, split, paths, *a, **k: features.ExtractSummary(split, len(paths), 0, 0, 1.0,
                                                                                         1.0, {}))


# ---- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--image-size", "10"], "--image-size 10 (given on the command line) is below xception's minimum"),
    (["--image-size", "32", "--backbones", "inception_v3"], "below inception_v3's minimum input size of 75"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--precision", "float16"], "--precision 'float16'"),
])
def test_bad_extract_options_are_refused_before_anything_is_written(capsys, tmp_path, args, needle):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    run = tmp_path / "run"
    message = refused(capsys, "extract", "--data", str(data), "--run", str(run), *EXTRACT, *args)
    assert needle in message
    assert not run.exists(), "a refused command left a run folder behind"


@pytest.mark.parametrize("args, needle", [
    (["--seed", "5000000"], "--seed 5000000"),
    (["--learning-rate", "nan"], "--learning-rate nan"),
    (["--learning-rate", "inf"], "--learning-rate inf"),
    (["--learning-rate", "-1"], "--learning-rate -1"),
    (["--learning-rate", "0"], "--learning-rate 0"),
    (["--learning-rate", "1e30"], "--learning-rate 1e+30"),
    (["--dropout", "1.5"], "--dropout 1.5"),
    (["--folds", "1"], "--folds 1"),
])
def test_bad_train_options_are_refused_and_nothing_recorded(capsys, tmp_path, no_extraction, args, needle):
    data = make_kaggle(tmp_path / "data", per_class=3, n_test=2)
    run = tmp_path / "run"
    assert cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT]) == 0
    capsys.readouterr()
    before = (run / "config.json").read_bytes()
    message = refused(capsys, "train", "--run", str(run), *args)
    assert needle in message
    assert (run / "config.json").read_bytes() == before
    assert "NaN" not in before.decode() and "Infinity" not in before.decode()
    assert not (run / "heads").exists()


@pytest.mark.parametrize("section, key, value, needle", [
    ("extract", "image_size", -5, "--image-size -5"),
    ("extract", "image_size", "75", "'75' (a string)"),
    ("extract", "image_size", [75], "--image-size"),
    ("extract", "backbones", 5, "--backbones"),
    ("extract", "batch_size", 0, "--batch-size 0"),
    ("extract", "batch_size", 2.5, "--batch-size 2.5"),
    ("extract", "seed", "abc", "--seed 'abc'"),
    ("train", "folds", "3", "must be a whole number, not '3' (a string)"),
    ("train", "dropout", 1.5, "--dropout 1.5"),
    ("train", "epochs", 0, "--epochs 0"),
    ("train", "learning_rate", "fast", "--learning-rate 'fast'"),
])
def test_a_hand_edited_config_with_a_wrong_value_names_the_file_and_key(capsys, tmp_path, section, key, value,
                                                                         needle):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    saved = {"data": str(data), "extract": {"backbones": ["xception"], "weights": "random", "image_size": 75},
             "train": {"folds": 2}}
    saved[section][key] = value
    config = tmp_path / "config.json"
    config.write_text(json.dumps(saved))
    message = refused(capsys, "run", "--config", str(config), "--run", str(tmp_path / "run"),
                      "--out", str(tmp_path / "s.csv"))
    assert needle in message and str(config) in message
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_an_object_is_refused(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text("[1, 2]")
    message = refused(capsys, "run", "--config", str(config), "--out", str(tmp_path / "s.csv"))
    assert str(config) in message and "not a JSON object" in message


# ---- data folders --------------------------------------------------------------------------------

def test_a_flat_test_folder_with_a_class_folder_in_it_is_refused(capsys, tmp_path):
    root = make_folders(tmp_path / "data", labelled_test=False)
    shutil.copytree(root / "train" / "kind 0", root / "test" / "kind 0")
    message = refused(capsys, "extract", "--data", str(root), "--run", str(tmp_path / "run"), *EXTRACT)
    assert f"{root / 'test'} holds both images" in message and "'kind 0'" in message


def test_skip_keeps_a_good_image_whose_stem_a_bad_one_shares(capsys, tmp_path, no_extraction):
    root = make_folders(tmp_path / "data", per_class=3)
    good = root / "train" / "kind 1" / "img.jpg"
    save_rgb(good, draw(1, np.random.default_rng(5)))
    (root / "train" / "kind 1" / "img.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    assert cli.main(["extract", "--data", str(root), "--run", str(run), *EXTRACT, "--on-bad-image", "skip"]) == 0
    dataset = json.loads((run / "dataset.json").read_text())
    paths = [row["path"] for row in dataset["train"]]
    assert "train/kind 1/img.jpg" in paths and "train/kind 1/img.png" not in paths
    bad = json.loads((run / "bad_images.json").read_text())["train"]
    assert [Path(b["path"]).name for b in bad] == ["img.png"]


def test_files_not_used_are_listed_with_their_reason_and_tiff_and_gif_are_read(caplog, tmp_path):
    root = make_folders(tmp_path / "data", labelled_test=False)
    folder = root / "train" / "kind 2"
    rgb = draw(2, np.random.default_rng(3))
    save_rgb(folder / "scan.tif", rgb)
    save_rgb(folder / "anim.gif", rgb)
    (folder / "notes.txt").write_text("a note")
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    os.symlink(tmp_path / "nowhere.jpg", folder / "gone.jpg")
    os.symlink(folder / "loop.jpg", folder / "loop.jpg")
    (root / "test" / "stray folder").mkdir()
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(root)
    names = {it.path.name for it in dataset.train}
    assert {"scan.tif", "anim.gif"} <= names
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"4 files in {folder} are not used" in warnings
    assert "gone.jpg is a broken symbolic link" in warnings and "loop.jpg is a symbolic link that loops" in warnings
    assert "notes.txt has an extension (.txt)" in warnings and "photo.heic has an extension (.heic)" in warnings
    assert "stray folder is a folder" in warnings and "class" not in warnings.split("stray folder")[1][:20]


def test_the_sample_submissions_id_header_is_kept_as_written(tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=3)
    sample = pd.read_csv(data / "sample_submission.csv").rename(columns={"id": " ID "})
    sample.to_csv(data / "sample_submission.csv", index=False)
    dataset = load_dataset(data)
    assert dataset.id_column == " ID "
    ids = [it.id for it in dataset.test]
    frame = submission.build(ids, dataset.classes, np.full((3, 3), 1 / 3), dataset.id_column)
    out = submission.write(frame, tmp_path / "sub.csv", ids, dataset.classes, dataset.id_column)
    assert out.read_text().splitlines()[0] == ",".join([" ID ", *dataset.classes])


def test_a_duplicated_class_column_is_named_as_written(capsys, tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    path = data / "sample_submission.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",class_0"] + [line + ",0" for line in lines[1:]]) + "\n")
    message = refused(capsys, "extract", "--data", str(data), "--run", str(tmp_path / "run"), *EXTRACT)
    assert "names the same column more than once: 'class_0'" in message and "class_0.1" not in message


def test_the_label_column_used_is_named(caplog, tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    labels = pd.read_csv(data / "labels.csv").assign(note="x")
    labels.to_csv(data / "labels.csv", index=False)
    with caplog.at_level(logging.INFO):
        load_dataset(data)
    assert any("the 'breed' column of" in r.getMessage() and "'note'" in r.getMessage() for r in caplog.records)


# ---- nothing clobbered, nothing left behind ------------------------------------------------------

def _frame(ids=("a", "b")):
    return submission.build(list(ids), ["x", "y"], np.full((len(ids), 2), 0.5))


def test_out_through_a_symlink_keeps_the_link_and_replaces_its_target(tmp_path):
    target = tmp_path / "real" / "sub.csv"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    submission.write(_frame(), link, ["a", "b"], ["x", "y"])
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().splitlines()[0] == "id,x,y"


def test_out_to_a_fifo_writes_into_it_and_keeps_it_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    submission.write(_frame(), fifo, ["a", "b"], ["x", "y"])
    reader.join(timeout=10)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert received and received[0].splitlines() == ["id,x,y", "a,0.5,0.5", "b,0.5,0.5"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is needed to simulate a full device")
def test_out_to_a_device_is_written_not_replaced(tmp_path):
    with pytest.raises(Exception, match="Could not write /dev/full: the disk is full"):
        submission.write(_frame(), "/dev/full", ["a", "b"], ["x", "y"])
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "the device node was replaced"


def test_out_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(Exception, match="it is a folder, not a file") as info:
        submission.write(_frame(), tmp_path, ["a", "b"], ["x", "y"])
    assert "check the disk" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_demo_data_refuses_a_folder_that_is_not_empty(capsys, tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    labels = (data / "labels.csv").read_bytes()
    message = refused(capsys, "demo-data", "--out", str(data))
    assert f"{data} is not empty" in message
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert (data / "labels.csv").read_bytes() == labels


def test_a_refused_extract_or_report_leaves_no_run_folder_behind(capsys, tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    (data / "test" / "te00.png").write_text("not an image")
    run = tmp_path / "runs" / "nested" / "run"
    assert cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT]) == 2
    assert "1 images cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    typo = tmp_path / "rnus" / "run"
    assert "does not exist" in refused(capsys, "report", "--run", str(typo))
    assert not (tmp_path / "rnus").exists()


def test_quiet_hides_progress_bars(capsys, tmp_path, no_extraction):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    assert cli.main(["extract", "--data", str(data), "--run", str(tmp_path / "a"), *EXTRACT]) == 0
    assert "check images" in capsys.readouterr().err
    try:
        assert cli.main(["-q", "extract", "--data", str(data), "--run", str(tmp_path / "b"), *EXTRACT]) == 0
        assert "check images" not in capsys.readouterr().err
    finally:
        cli.progress.show(True)


# ---- messages ------------------------------------------------------------------------------------

def test_heads_that_learn_nothing_or_hit_the_epoch_cap_are_warned_about():
    from transfer_ensemble.crossval import training_warnings

    capped = [{"epochs_run": 20, "best_epoch": 20}] * 4
    stopped = capped[:3] + [{"epochs_run": 12, "best_epoch": 7}]
    assert training_warnings("r", 0.30, 10, stopped, 20) == []
    nothing = training_warnings("r", 0.99 * math.log(10), 10, stopped, 20)
    assert len(nothing) == 1 and "learned almost nothing" in nothing[0] and "ln(10) = 2.3026" in nothing[0]
    cap = training_warnings("r", 0.30, 10, capped, 20)
    assert len(cap) == 1 and "ran all 20 epochs" in cap[0] and "Raise --epochs" in cap[0]


NOISY = r"""
import os, sys
from transfer_ensemble import noise
with noise.filtered_stderr():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1795750640.276283    7483 cudart_stub.cc:31] Could not find cuda drivers\n")
    os.write(2, b"our own line\n")
    os.write(2, b"Corrupt JPEG data: 2 extraneous bytes before marker 0xd9\n")
    sys.stderr.write("\rbar 50%")
    sys.stderr.flush()
    os.write(2, b"I0000 00:00:17.2 1 port.cc:153] oneDNN custom operations are on\n")
    os.write(2, b"E0000 00:00:17.2 1 x.cc:1] a real error stays\n")
print("done", file=sys.stderr)
"""


def test_c_library_noise_is_dropped_from_stderr_and_the_rest_kept():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"our own line\n\rbar 50%E0000 00:00:17.2 1 x.cc:1] a real error stays\ndone\n"


# ---- decompression bombs -------------------------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A small file whose PNG header declares width x height (what a decompression bomb looks like)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                     + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64)


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path):
    from transfer_ensemble import images

    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    reason = images.check(bomb)
    assert reason.startswith("is 30000 x 30000 pixels (900,000,000), more than the limit of 178,956,970")
    assert "--max-pixels" in reason
    small = tmp_path / "small.png"
    save_rgb(small, draw(0, np.random.default_rng(0)))
    assert images.check(small) is None and "more than the limit of 1,000" in images.check(small, max_pixels=1000)
    for ext in (".png", ".jpg", ".gif", ".bmp", ".webp"):
        import cv2

        ok, data = cv2.imencode(ext, np.zeros((48, 64, 3), np.uint8))
        assert images.header_size(data.tobytes()) == (64, 48), ext


def test_extract_lists_images_over_max_pixels_and_does_not_cache_that_verdict(capsys, tmp_path, no_extraction):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    run = tmp_path / "run"
    assert cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT, "--max-pixels", "1000"]) == 2
    err = capsys.readouterr().err
    assert "8 images cannot be decoded" in err and "more than the limit of 1,000 (--max-pixels)" in err
    assert cli.main(["extract", "--data", str(data), "--run", str(run), *EXTRACT]) == 0
    assert json.loads((run / "config.json").read_text())["extract"]["max_pixels"] == 178_956_970


def test_decoding_threads_share_a_pixel_budget():
    from transfer_ensemble.images import PixelBudget

    budget = PixelBudget(100)
    inside = threading.Event()
    order = []
    with budget.hold(80):
        def second():
            with budget.hold(50):
                order.append("second")
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.2)
        assert thread.is_alive(), "a decode over the budget did not wait"
        order.append("first done")
    thread.join(timeout=5)
    assert order == ["first done", "second"]
    with budget.hold(500):  # one image alone may exceed the budget
        inside.set()
    assert inside.is_set() and budget.used == 0


def test_opencvs_own_size_limit_is_worded(tmp_path, monkeypatch):
    import cv2

    from transfer_ensemble import images

    path = tmp_path / "huge.tif"
    save_rgb(path, draw(0, np.random.default_rng(0)))

    def over_limit(*args, **kwargs):
        raise cv2.error("OpenCV(5.0.0) loadsave.cpp:77: error: (-215:Assertion failed) "
                        "pixels <= CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'")

    monkeypatch.setattr(cv2, "imdecode", over_limit)
    reason = images.check(path)
    assert reason.startswith("is larger than OpenCV decodes") and "Assertion" not in reason


def test_a_cache_dir_under_a_file_says_so(tmp_path):
    from transfer_ensemble import predict
    from transfer_ensemble.errors import UserError
    from transfer_ensemble.runfolder import PredictCache

    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(UserError, match="a part of that path is an existing file, not a folder. Pass --cache-dir"):
        predict._cache_lock(PredictCache(blocker / "key"), False, tmp_path / "run")

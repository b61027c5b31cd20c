"""The feature cache: resume after SIGKILL, exact invalidation, cache hits that build nothing.

Every extraction here runs in a subprocess, as a user would, with random weights at 75 px.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, draw, kill_part_way, make_kaggle, run_cli, save_rgb

from transfer_ensemble import images
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.store import StoreFiles

BATCH = 4
EXTRACT = ["--weights", "random", "--image-size", str(TINY), "--batch-size", str(BATCH), "--scales", "1"]
BACKBONES = ("xception", "inception_v3")
FILES = ("original.npy", "flipped.npy", "done.npy", "meta.json", "keys.json")


def extract(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_cli("extract", "--data", str(data), "--run", str(run), *EXTRACT, *extra)
    assert result.returncode == 0, result.stderr
    return result


def store(run: Path, split: str, backbone: str) -> StoreFiles:
    return RunFolder(run).store(split, backbone)


def features(run: Path, split: str, backbone: str) -> dict[str, np.ndarray]:
    return {view: np.load(store(run, split, backbone).view(view)) for view in ("original", "flipped")}


def ids(run: Path, split: str, backbone: str) -> list[str]:
    return json.loads(store(run, split, backbone).meta.read_text())["ids"]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {name: ((folder / name).stat().st_mtime_ns, (folder / name).read_bytes()) for name in FILES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """A data set of 18 training and 5 test images, and an uninterrupted extraction of it."""
    root = tmp_path_factory.mktemp("cache")
    data = make_kaggle(root / "data", per_class=6)
    run = root / "run"
    extract(data, run)
    return data, run


@pytest.fixture
def copied(reference, tmp_path) -> tuple[Path, Path]:
    """The reference data and run folder, copied with their modification times."""
    data, run = reference
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "data", tmp_path / "run"


@pytest.mark.slow
@pytest.mark.backend
def test_resume_after_sigkill_gives_identical_features(reference, tmp_path):
    data, ref_run = reference
    run = tmp_path / "run"
    kill_part_way(["extract", "--data", str(data), "--run", str(run), *EXTRACT],
                  store(run, "train", "inception_v3").done)

    resumed = extract(data, run)
    assert "reusing cached features" in resumed.stderr
    for split in ("train", "test"):
        for backbone in BACKBONES:
            assert ids(run, split, backbone) == ids(ref_run, split, backbone)
            got, want = features(run, split, backbone), features(ref_run, split, backbone)
            for view in want:
                assert np.array_equal(got[view], want[view]), (split, backbone, view)
            assert np.load(store(run, split, backbone).done).all()


@pytest.mark.slow
def test_changed_image_list_recomputes_only_changed_rows(copied, reference):
    data, run = copied
    old = {b: (ids(run, "train", b), features(run, "train", b)) for b in BACKBONES}
    test_before = {b: snapshot(store(run, "test", b).folder) for b in BACKBONES}
    labels = pd.read_csv(data / "labels.csv")
    removed = labels.iloc[3]["id"]
    (data / "train" / f"{removed}.png").unlink()
    save_rgb(data / "train" / "added.png", draw(1, np.random.default_rng(7)))
    labels = pd.concat([labels.drop(index=3), pd.DataFrame([{"id": "added", "breed": labels.iloc[0]["breed"]}])])
    labels.to_csv(data / "labels.csv", index=False)

    result = extract(data, run)
    n = len(labels)
    for backbone in BACKBONES:
        folder = store(run, "train", backbone).folder
        assert f"{folder}: reused {n - 1} of {n} rows from earlier features, 1 to compute" in result.stderr
        new_ids = ids(run, "train", backbone)
        assert "added" in new_ids and removed not in new_ids
        old_ids, old_features = old[backbone]
        new_features = features(run, "train", backbone)
        for row, image_id in enumerate(new_ids):
            if image_id == "added":
                continue
            for view in old_features:
                assert new_features[view][row].tobytes() == old_features[view][old_ids.index(image_id)].tobytes()
        assert snapshot(store(run, "test", backbone).folder) == test_before[backbone]
    assert re.search(r"^train\s+18\s+1\s+17\s.*\s1x\s+xception,inception_v3$", result.stdout, re.M), result.stdout
    assert re.search(r"^test\s+5\s+0\s+5\s.*\s1x\s+xception,inception_v3$", result.stdout, re.M), result.stdout
    assert "extracted the features of 1 image in " in result.stdout


@pytest.mark.slow
def test_changed_backbones_compute_only_the_new_backbone(copied):
    data, run = copied
    before = {split: snapshot(store(run, split, "xception").folder) for split in ("train", "test")}
    result = extract(data, run, "--backbones", "xception,mobilenet_v3_small")
    assert "reusing cached features that match (xception 18/18, mobilenet_v3_small 0/18)" in result.stderr
    assert "built mobilenet_v3_small in" in result.stderr and "built xception" not in result.stderr
    for split in ("train", "test"):
        assert snapshot(store(run, split, "xception").folder) == before[split]
        added = store(run, split, "mobilenet_v3_small")
        assert np.load(added.done).all()
        assert np.load(added.view("original")).shape[1] == 576


CACHE_HIT_SCRIPT = textwrap.dedent("""
    import json, sys
    from transfer_ensemble import backbones, workflow
    from transfer_ensemble.config import ExtractConfig

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone was built")

    backbones.build = no_backbone
    data, run, out = sys.argv[1:]
    config = ExtractConfig(weights="random", image_size=75, batch_size=4, scales=(1.0,))
    results = workflow.extract(data, run, config)
    tensorflow_after_extract = "tensorflow" in sys.modules or "keras" in sys.modules
    workflow.train(run, {"head": "seed", "folds": 2, "epochs": 2, "patience": 1})
    workflow.submit(run, out)
    print(json.dumps({"computed": sum(r.computed for r in results),
                      "reused": sum(r.reused for r in results),
                      "tensorflow_after_extract": tensorflow_after_extract}))
""")


@pytest.mark.slow
def test_cache_hit_and_train_and_submit_build_no_backbone(copied, tmp_path):
    data, run = copied
    before = {(s, b): snapshot(store(run, s, b).folder) for s in ("train", "test") for b in BACKBONES}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", CACHE_HIT_SCRIPT, str(data), str(run), str(tmp_path / "s.csv")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"computed": 0, "reused": 23, "tensorflow_after_extract": False}
    assert (tmp_path / "s.csv").exists()
    assert {(s, b): snapshot(store(run, s, b).folder) for s in ("train", "test") for b in BACKBONES} == before


def test_batches_carry_the_images_of_their_rows_in_order(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        save_rgb(paths[-1], draw(i, rng, size=TINY + 9 * (i % 2)))
    batches = list(images.iter_batches(paths, [4, 1, 2], TINY, batch_size=2))
    assert [b.rows.tolist() for b in batches] == [[4, 1], [2]]
    first = batches[0].pixels
    assert first.shape == (2, TINY, TINY, 3) and batches[1].pixels.shape == (1, TINY, TINY, 3)
    assert np.array_equal(first[0], images.load(paths[4], TINY))
    assert np.array_equal(first[1], images.load(paths[1], TINY))


def fake_load(started: list[int]):
    """A stand-in for images.load: an image whose pixels are its path's number; records each call."""
    def load(path, size, max_pixels=None, out=None):
        started.append(int(Path(path).stem))
        out = np.empty((size, size, 3), np.uint8) if out is None else out
        out[...] = int(Path(path).stem) % 256
        return out
    return load


def test_stream_decodes_ahead_across_batches_in_order_and_bounded(monkeypatch):
    started: list[int] = []
    monkeypatch.setattr(images, "load", fake_load(started))
    paths = [Path(f"{i}.png") for i in range(200)]
    rows = list(range(199, -1, -1))
    stream = images.iter_batches(paths, rows, 2, batch_size=8, workers=6, prefetch=2)
    first = next(stream)
    assert first.rows.tolist() == rows[:8]
    time.sleep(0.5)
    ahead = len(started)
    assert 8 < ahead <= (2 * 2 + 2) * 8, ahead
    rest = list(stream)
    got = np.concatenate([first.rows] + [b.rows for b in rest])
    assert got.tolist() == rows
    for batch in [first, *rest]:
        assert np.array_equal(batch.pixels[:, 0, 0, 0], batch.rows % 256)
    assert sorted(started) == list(range(200))


def test_stream_raises_a_bad_image_in_order_and_stops_early_without_waiting(monkeypatch):
    started: list[int] = []
    good = fake_load(started)

    def load(path, size, max_pixels=None, out=None):
        if Path(path).stem == "37":
            raise images.ImageReadError(f"{path}: not an image")
        return good(path, size, max_pixels, out)

    monkeypatch.setattr(images, "load", load)
    paths = [Path(f"{i}.png") for i in range(100)]
    seen = []
    with pytest.raises(images.ImageReadError, match="37.png"):
        for batch in images.iter_batches(paths, range(100), 2, batch_size=10, workers=4):
            seen += batch.rows.tolist()
    assert seen == list(range(30))

    started.clear()
    stream = images.iter_batches([Path(f"{i}.png") for i in range(100_000)], range(100_000), 2, batch_size=10)
    next(stream)
    stream.close()
    assert len(started) < 1000


def test_stream_keeps_decoding_later_batches_while_one_image_is_slow(monkeypatch):
    started: list[int] = []
    fast = fake_load(started)
    seen_while_slow = []

    def load(path, size, max_pixels=None, out=None):
        image = fast(path, size, max_pixels, out)
        if Path(path).stem == "0":
            time.sleep(0.5)
            seen_while_slow.append(len(started))
        return image

    monkeypatch.setattr(images, "load", load)
    paths = [Path(f"{i}.png") for i in range(64)]
    batches = list(images.iter_batches(paths, range(64), 2, batch_size=8, workers=4, prefetch=2))
    assert [b.rows.tolist() for b in batches] == [list(range(i, i + 8)) for i in range(0, 64, 8)]
    assert seen_while_slow == [16]


class RecordingStore:
    """A stand-in store for `store.Writer`: records the first row of each write, slowly;
    raises a full-disk error at row `fail_at`."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.written: list[int] = []
        self.fail_at = fail_at

    def write_missing(self, rows, values) -> None:
        time.sleep(0.01)
        if rows[0] == self.fail_at:
            raise OSError(28, "No space left on device")
        self.written.append(int(rows[0]))


def test_writer_commits_in_order_and_at_most_depth_batches_wait():
    from transfer_ensemble.store import Writer

    store = RecordingStore()
    with Writer() as writer:
        for i in range(12):
            writer.put(store, np.array([i]), {})
            assert i - len(store.written) <= Writer.DEPTH + 1
    assert store.written == list(range(12))


def test_writer_raises_what_its_thread_met_and_stops_soon_after():
    from transfer_ensemble.store import Writer

    store = RecordingStore(fail_at=3)
    with pytest.raises(OSError, match="No space left"):
        with Writer() as writer:
            for i in range(12):
                writer.put(store, np.array([i]), {})
    assert store.written[:3] == [0, 1, 2] and 3 not in store.written
    assert len(store.written) <= 3 + Writer.DEPTH  # what was queued behind the error at most


def test_writer_keeps_what_was_computed_when_the_extraction_fails():
    from transfer_ensemble.store import Writer

    store = RecordingStore()
    with pytest.raises(KeyboardInterrupt):
        with Writer() as writer:
            for i in range(3):
                writer.put(store, np.array([i]), {})
            raise KeyboardInterrupt
    assert store.written == [0, 1, 2]

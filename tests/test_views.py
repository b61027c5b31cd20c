"""Views as data: each view's features are the backbone's features of the transformed image, a
store gains a view without recomputing the others, old stores keep working, seeds are fixed."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest

from conftest import save_rgb
from transfer_ensemble import backbones, crossval, features, images, views
from transfer_ensemble.config import MAX_FOLDS, MAX_SEED, ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.store import STORE_VERSION, StoreFiles, load_features, open_store

SIZE = 32  # MobileNetV3Small's smallest input: the smallest pass there is


def _direct(extractor: features.Extractor, spec, pixels: np.ndarray, name: str) -> np.ndarray:
    """The view made on the host (crop with OpenCV's bilinear resize, then mirror) and the
    model run on it eagerly: what the compiled pass must agree with."""
    size = extractor.size(spec)
    view = views.get(name)
    out = []
    for image in pixels.astype(np.float32):
        if view.crop is not None:
            top, left, side = view.crop.box(size)
            image = cv2.resize(image[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_LINEAR)
        if view.mirror:
            image = image[:, ::-1]
        out.append(image)
    model = extractor.model(spec).model
    preprocess = backbones.preprocess_input(spec)
    return np.asarray(model(preprocess(np.stack(out)), training=False), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.backend
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_each_view_is_the_backbone_on_its_transformed_image(scale):
    """Every registered view, computed in the compiled pass, equals the backbone's features of
    the image cropped and resized (then mirrored) on the host; a batch shorter than the compiled
    one is cut back to its own rows."""
    spec = backbones.get_spec("mobilenet_v3_small")
    config = ExtractConfig(backbones=(spec.name,), weights="random", image_size=SIZE, batch_size=4,
                           scales=(1.0, 1.5), views="ten_crop")
    extractor = features.Extractor(config, scale)
    pixels = np.random.default_rng(3).integers(0, 256, (3, extractor.size(spec), extractor.size(spec), 3),
                                               dtype=np.uint8)
    got = extractor.forward(spec, pixels)
    assert list(got) == list(views.REGISTRY)
    scale_of = np.abs(got["original"]).max()
    for name, values in got.items():
        assert values.shape == (3, spec.width), name
        np.testing.assert_allclose(values, _direct(extractor, spec, pixels, name), rtol=1e-3,
                                   atol=1e-3 * scale_of, err_msg=name)
    assert not np.allclose(got["center"], got["original"], rtol=1e-3, atol=0)
    assert not np.allclose(got["top_left"], got["bottom_right"], rtol=1e-3, atol=0)


def test_crop_boxes_are_where_their_names_say():
    assert views.Crop(0.875, "center").box(32) == (2, 2, 28)
    assert views.Crop(0.875, "top_left").box(32) == (0, 0, 28)
    assert views.Crop(0.875, "top_right").box(32) == (0, 4, 28)
    assert views.Crop(0.875, "bottom_left").box(32) == (4, 0, 28)
    assert views.Crop(0.875, "bottom_right").box(32) == (4, 4, 28)


def test_views_option_always_holds_the_pair_in_registry_order():
    assert ExtractConfig().views == views.PAIR
    assert ExtractConfig(views="center,original").views == ("original", "flipped", "center")
    assert ExtractConfig(views="five_crop").views == ("original", "flipped", "center", "top_left", "top_right",
                                                      "bottom_left", "bottom_right")
    assert ExtractConfig.from_json({"views": ["flipped", "center_flipped"]}).views == \
        ("original", "flipped", "center_flipped")
    with pytest.raises(Exception, match="--views 'middle'.*not a view"):
        ExtractConfig(views="middle")


@pytest.mark.parametrize("value, problem", [
    ("", "names no view"), (",", "names no view"), (" , ", "names no view"),
    ("center,,flipped", "empty name between its commas"),
    ("center,center", "names center more than once"), ("center,Center", "names center more than once"),
    ("centre", r"'centre', which is not a view \(did you mean 'center'\?\)"),
    ("five_crops", r"did you mean 'five_crop'\?"),
])
def test_views_option_refuses_empty_repeated_and_unknown_names(value, problem):
    """Nothing named is an error, not the pair; a name twice is refused; a near miss is named."""
    with pytest.raises(UserError, match=f"--views {re.escape(repr(value))} .*{problem}"):
        ExtractConfig(views=value)


def test_view_names_ignore_case_and_hyphens_as_backbone_names_do():
    assert ExtractConfig(views="Center-Flipped").views == ("original", "flipped", "center_flipped")
    assert ExtractConfig(views=" FIVE-CROP ").views == views.SETS["five_crop"]
    assert ExtractConfig(views=["Original", "center"]).views == ("original", "flipped", "center")


def test_fold_seeds_of_the_existing_views_are_unchanged():
    """seed*1000 + index*100 + fold for the original (0), flipped (1) and pooled (2) groups, as
    before views were a registry; every further view has its own fixed offset."""
    assert crossval.fold_seed(7, "original", 3) == 7003
    assert crossval.fold_seed(7, "flipped", 4) == 7104
    assert crossval.fold_seed(7, "pooled", 0) == 7200
    offsets = [views.seed_offset(v) for v in views.REGISTRY] + [views.seed_offset("pooled")]
    assert len(set(offsets)) == len(offsets)
    seeds = {crossval.fold_seed(MAX_SEED, g, f) for g in (*views.REGISTRY, "pooled") for f in range(MAX_FOLDS)}
    assert len(seeds) == (len(views.REGISTRY) + 1) * MAX_FOLDS and max(seeds) < 2**32


def test_pixel_cost_counts_views_and_scales():
    assert views.pixel_cost(views.PAIR, (1.0,)) == 1.0
    assert views.pixel_cost(views.PAIR, (1.0, 1.5)) == 3.25
    assert views.pixel_cost(views.SETS["center_pair"], (1.0,)) == 2.0


def _images(tmp_path, n: int = 5):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        save_rgb(tmp_path / "img" / f"{i}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        paths.append(tmp_path / "img" / f"{i}.png")
    return paths, [r.sha256 for r in images.inspect_all(paths)]


def _extract(tmp_path, paths, keys, view_set: str, calls: list | None = None) -> StoreFiles:
    spec = backbones.get_spec("mobilenet_v3_small")
    extractor = features.Extractor(ExtractConfig(backbones=(spec.name,), weights="random", image_size=SIZE,
                                                 batch_size=4, scales=(1.0,), views=view_set))
    if calls is not None:
        dispatch = extractor.dispatch

        def recording(spec, pixels, wanted=None):
            calls.append((len(pixels), tuple(wanted)))
            return dispatch(spec, pixels, wanted)

        extractor.dispatch = recording
    store = StoreFiles(tmp_path / "features" / spec.name)
    features.extract_split(extractor, "train", paths, [str(i) for i in range(len(paths))], keys, lambda _: store)
    return store


@pytest.mark.slow
def test_a_view_added_to_a_store_computes_only_that_view(tmp_path):
    paths, keys = _images(tmp_path)
    store = _extract(tmp_path, paths, keys, "pair")
    before = {name: store.view(name).read_bytes() for name in views.PAIR}
    done_before = store.done.read_bytes()
    identity = store.identity()
    calls: list = []
    _extract(tmp_path, paths, keys, "original,flipped,center", calls)
    assert calls == [(4, ("center",)), (1, ("center",))], "only the new view, in full and short batches"
    assert {name: store.view(name).read_bytes() for name in views.PAIR} == before
    assert store.done.read_bytes() == done_before
    assert np.load(store.done_of("center")).all()
    assert json.loads(store.meta.read_text())["views"] == ["original", "flipped", "center"]
    assert store.identity() == identity, "adding a view keeps the store's feature identity"
    loaded = load_features([store], "center", [str(i) for i in range(len(paths))])
    assert loaded.shape == (5, 576) and not np.allclose(loaded, np.load(store.view("original")), rtol=1e-3, atol=0)
    calls.clear()
    _extract(tmp_path, paths, keys, "pair", calls)
    assert calls == [], "a store holding more views than asked for computes nothing"


def _bytes(store: StoreFiles, names) -> dict[str, bytes]:
    return {name: store.view(name).read_bytes() for name in names}


@pytest.mark.slow
def test_a_view_resumed_alone_is_computed_in_its_whole_pass_as_uninterrupted(tmp_path):
    """A kill between the done-mask writes of one batch (center committed, center_flipped not):
    the resumed batch runs the whole crop pass again and writes only center_flipped, so every view
    is byte-identical with an uninterrupted extraction."""
    paths, keys = _images(tmp_path)
    reference = _bytes(_extract(tmp_path / "reference", paths, keys, "center_pair"), views.SETS["center_pair"])
    store = _extract(tmp_path / "killed", paths, keys, "center_pair")
    done = np.load(store.done_of("center_flipped"))
    done[:4] = False  # the first batch's center_flipped rows, not committed when the process died
    np.save(store.done_of("center_flipped"), done)
    flipped = np.load(store.view("center_flipped"))
    flipped[:4] = 0
    np.save(store.view("center_flipped"), flipped)
    calls: list = []
    _extract(tmp_path / "killed", paths, keys, "center_pair", calls)
    assert calls == [(4, ("center", "center_flipped"))], "the first batch's whole crop pass, again"
    assert _bytes(store, views.SETS["center_pair"]) == reference


@pytest.mark.slow
def test_a_view_added_beside_its_crop_is_computed_as_in_an_uninterrupted_extract(tmp_path):
    """center_flipped added to a store that has center: computed in the center crop's pass, as an
    extraction of center_pair from scratch computes it; center itself is not written again."""
    paths, keys = _images(tmp_path)
    reference = _bytes(_extract(tmp_path / "reference", paths, keys, "center_pair"), ["center_flipped"])
    store = _extract(tmp_path / "grown", paths, keys, "original,flipped,center")
    center = _bytes(store, ["center"])
    calls: list = []
    _extract(tmp_path / "grown", paths, keys, "center_pair", calls)
    assert calls == [(4, ("center", "center_flipped")), (1, ("center", "center_flipped"))]
    assert _bytes(store, ["center_flipped"]) == reference
    assert _bytes(store, ["center"]) == center


def test_a_due_view_brings_the_whole_pass_of_its_crop():
    assert views.whole_passes(views.SETS["ten_crop"], ["center_flipped"]) == ("center", "center_flipped")
    assert views.whole_passes(views.SETS["ten_crop"], ["flipped", "top_left"]) == \
        ("original", "flipped", "top_left", "top_left_flipped")
    assert views.whole_passes(views.SETS["five_crop"], ["center"]) == ("center",), "only the wanted views"
    assert views.whole_passes(views.PAIR, []) == ()


def test_a_store_from_before_views_were_recorded_keeps_working(tmp_path):
    """Two views, done.npy, no "views" in meta.json: opened as is, nothing to compute, same identity."""
    meta = {"backbone": "b", "width": 3, "weights": "w", "image_size": 9, "precision": "float32",
            "preprocess": backbones.settings(backbones.get_spec("xception"))["preprocess"], "store_version": STORE_VERSION, "ids": ["x", "y"]}
    files = StoreFiles(tmp_path / "old")
    files.folder.mkdir()
    for name in views.PAIR:
        np.save(files.view(name), np.full((2, 3), 1.0 if name == "original" else 2.0, np.float32))
    np.save(files.done, np.ones(2, bool))
    files.meta.write_text(json.dumps(meta))
    files.keys.write_text(json.dumps(["ka", "kb"]))
    identity = files.identity()
    store = open_store(files, meta, ["ka", "kb"])
    assert store.done.all() and store.missing_views(np.arange(2)) == ()
    assert files.identity() == identity
    np.testing.assert_array_equal(load_features([files], "flipped", ["x", "y"]), np.full((2, 3), 2.0))
    grown = open_store(files, meta, ["ka", "kb"], wanted=views.SETS["center_pair"])
    assert grown.missing_views(np.arange(2)) == ("center", "center_flipped")
    assert files.identity() == identity and sorted(p.name for p in files.folder.iterdir()) == [
        "center.npy", "center_flipped.npy", "done.npy", "done_center.npy", "done_center_flipped.npy",
        "flipped.npy", "keys.json", "meta.json", "original.npy"]

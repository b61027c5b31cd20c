"""The flipped view is the left-right mirror of the original, computed in the same pass."""

import numpy as np
import pytest

from conftest import TINY, save_rgb
from transfer_ensemble import backbones, images
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.features import Extractor, extract_split
from transfer_ensemble.store import StoreFiles


@pytest.mark.slow
def test_flipped_view_is_the_left_right_mirror(tmp_path):
    rng = np.random.default_rng(0)
    asym = rng.integers(0, 255, size=(TINY, TINY, 3), dtype=np.uint8)
    asym[:, : TINY // 3] = (255, 0, 0)
    half = rng.integers(0, 255, size=(TINY, (TINY + 1) // 2, 3), dtype=np.uint8)
    sym = np.concatenate([half, half[:, ::-1][:, TINY % 2:]], axis=1)
    assert np.array_equal(sym, sym[:, ::-1])
    paths = []
    for name, image in (("asym", asym), ("mirror", asym[:, ::-1]), ("sym", sym)):
        save_rgb(tmp_path / "img" / f"{name}.png", image)
        paths.append(tmp_path / "img" / f"{name}.png")
    keys = [r.sha256 for r in images.inspect_all(paths)]

    extractor = Extractor(ExtractConfig(backbones=("xception", "inception_v3"), weights="random",
                                        image_size=TINY, batch_size=4))
    extract_split(extractor, "test", paths, ["asym", "mirror", "sym"], keys,
                  lambda name: StoreFiles(tmp_path / "features" / name))
    for backbone in ("xception", "inception_v3"):
        store = StoreFiles(tmp_path / "features" / backbone)
        original, flipped = np.load(store.view("original")), np.load(store.view("flipped"))
        asym_i, mirror_i, sym_i = 0, 1, 2
        np.testing.assert_allclose(original[sym_i], flipped[sym_i], rtol=1e-5, atol=1e-9)
        assert not np.allclose(original[asym_i], flipped[asym_i], rtol=1e-3, atol=0)
        np.testing.assert_allclose(flipped[asym_i], original[mirror_i], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(flipped[mirror_i], original[asym_i], rtol=1e-4, atol=1e-9)


@pytest.mark.slow
@pytest.mark.backend
def test_the_pass_mirrors_each_image_in_the_graph():
    """The compiled pass makes the mirrors itself: its flipped view of an image is its original
    view of the mirrored image, on every backend, and a batch smaller than the last is cut back
    to its own rows."""
    spec = backbones.get_spec("mobilenet_v3_small")
    extractor = Extractor(ExtractConfig(backbones=(spec.name,), weights="random", image_size=TINY, batch_size=4))
    pixels = np.random.default_rng(1).integers(0, 256, (3, TINY, TINY, 3), dtype=np.uint8)
    views = extractor.forward(spec, pixels)
    mirrored = extractor.forward(spec, np.ascontiguousarray(pixels[:, :, ::-1]))
    assert views["original"].shape == views["flipped"].shape == (3, spec.width)
    scale = np.abs(views["original"]).max()  # untrained MobileNetV3 features are about 1e-10
    assert not np.allclose(views["original"], views["flipped"], rtol=1e-3, atol=0)
    np.testing.assert_allclose(views["flipped"], mirrored["original"], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(views["original"], mirrored["flipped"], rtol=1e-4, atol=1e-4 * scale)

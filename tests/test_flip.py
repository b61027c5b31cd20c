"""The flipped view is the left-right mirror of the original, computed in the same pass."""

import numpy as np
import pytest

from conftest import TINY, save_rgb
from transfer_ensemble import images
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.features import Extractor, extract_split
from transfer_ensemble.runfolder import StoreFiles


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


def test_one_mirror_for_files_and_arrays():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.mirror(image), image[:, ::-1])
    np.testing.assert_array_equal(images.mirror(images.mirror(image)), image)

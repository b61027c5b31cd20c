"""--weights: a folder of Keras's published .h5 files, and the offline ImageNet failure."""

import h5py
import numpy as np
import pytest

from conftest import TINY, draw, make_kaggle, run_cli
from transfer_ensemble import backbones
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.features import Extractor

pytestmark = pytest.mark.slow  # every test builds a backbone or runs the CLI in a subprocess


def test_weights_dir_loads_legacy_h5_under_the_standard_name(tmp_path):
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    spec = backbones.get_spec("xception")
    keras.utils.set_random_seed(123)
    reference = keras.applications.Xception(include_top=False, pooling="avg", weights=None,
                                            input_shape=(TINY, TINY, 3))
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    with h5py.File(weights_dir / spec.weights_file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    assert spec.weights_file == "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"

    extractor = Extractor(ExtractConfig(backbones=("xception",), weights=str(weights_dir), image_size=TINY))
    assert extractor.sources["xception"].identity.startswith("sha256:")
    rng = np.random.default_rng(0)
    pixels = np.stack([draw(i, rng, size=TINY) for i in range(3)])
    expected = reference.predict_on_batch(backbones.preprocess_fn(spec)(pixels))
    views = extractor.forward(spec, pixels)
    final = slice(0, spec.width)  # the middle layer's columns follow (tests/test_mid_layer.py)
    np.testing.assert_allclose(views["original"][:, final], expected, rtol=1e-5, atol=1e-7)
    mirrored = reference.predict_on_batch(backbones.preprocess_fn(spec)(pixels[:, :, ::-1]))
    np.testing.assert_allclose(views["flipped"][:, final], mirrored, rtol=1e-5, atol=1e-7)

    keras.utils.set_random_seed(456)
    other = Extractor(ExtractConfig(backbones=("xception",), weights="random", seed=456, image_size=TINY))
    assert not np.allclose(other.forward(spec, pixels)["original"][:, final], expected, rtol=1e-3)


def test_weights_dir_without_the_file_names_it(tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    empty = tmp_path / "weights"
    empty.mkdir()
    result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), "--weights", str(empty))
    assert result.returncode == 2
    assert "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.backend
def test_offline_imagenet_failure_is_one_clear_message(tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    result = run_cli("extract", "--data", str(data), "--run", str(tmp_path / "run"), "--image-size", str(TINY),
                     env={"KERAS_HOME": str(keras_home)}, timeout=300)
    assert result.returncode == 2, result.stderr
    message = result.stderr
    assert "Traceback" not in message
    assert "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(keras_home / "models") in message
    assert "--weights WEIGHTS_DIR" in message
    assert "Downloading" not in result.stdout, "Keras's download message must go to stderr"


def test_random_weights_identity_names_the_backend_other_than_tensorflow(monkeypatch):
    from transfer_ensemble import backend

    spec = backbones.get_spec("xception")
    monkeypatch.setattr(backend, "name", lambda: "tensorflow")
    assert backbones.resolve_weights(spec, "random", 3).identity == "random:seed=3"  # as stores recorded it
    monkeypatch.setattr(backend, "name", lambda: "jax")
    assert backbones.resolve_weights(spec, "random", 3).identity == "random:seed=3:backend=jax"
    assert backbones.resolve_weights(backbones.get_spec("dinov2_small"), "random").identity == \
        "random:seed=0:backend=jax"


def test_a_run_on_random_jax_weights_is_refused_by_predict_on_tensorflow(tmp_path):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)
    run = tmp_path / "run"
    options = ["--weights", "random", "--backbones", "mobilenet_v3_small", "--image-size", "32", "--scales", "1"]
    trained = run_cli("run", "--data", str(data), "--run", str(run), "--out", str(tmp_path / "sub.csv"), *options,
                      "--head", "seed", "--folds", "2", "--epochs", "2", "--patience", "1",
                      env={"KERAS_BACKEND": "jax"})
    assert trained.returncode == 0, trained.stderr
    result = run_cli("predict", "--run", str(run), "--images", str(data / "test"), "--out", str(tmp_path / "p.csv"),
                     env={"KERAS_BACKEND": "tensorflow"})
    assert result.returncode == 2, result.stderr
    assert "random:seed=0:backend=jax" in result.stderr and "Traceback" not in result.stderr
    assert "KERAS_BACKEND=jax" in result.stderr and "Pass --weights" not in result.stderr


def test_weights_dir_with_only_xceptions_file_says_how_to_go_on_with_xception_alone(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / backbones.get_spec("xception").weights_file).write_bytes(b"xception weights")
    with pytest.raises(UserError) as info:
        Extractor(ExtractConfig(weights=str(weights)))
    message = str(info.value)
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "--backbones xception " in message or message.endswith("--backbones xception.")

"""The keras.applications builder: its table of backbones, frozen and globally average pooled.

Each entry names the Keras constructor, the module whose ``preprocess_input`` it needs, its
native input size, the width of its pooled output and the .h5 file Keras publishes for it, like
Keras's own application registry, and (for the default backbones) the middle layer `--mid-layer`
pools beside the final one. Keras is imported only when a backbone is built.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from transfer_ensemble.backbones.spec import BackboneSpec, Preprocessing, WeightsSource, file_sha256
from transfer_ensemble.errors import UserError

BUILDER = "keras.applications"


def _spec(name: str, constructor: str, module: str, size: int, width: int, weights_file: str,
          min_size: int = 32, mid: tuple[str, int] = ("", 0)) -> BackboneSpec:
    return BackboneSpec(name, BUILDER, size, width, Preprocessing(module=module), min_size=min_size,
                        constructor=constructor, weights_file=weights_file, mid_layer=mid[0], mid_width=mid[1])


_TF = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
_EFF = "efficientnet{}_notop.h5"
_V2 = "efficientnetv2-{}_notop.h5"

TABLE: dict[str, BackboneSpec] = {s.name: s for s in [
    _spec("xception", "Xception", "xception", 299, 2048, "xception" + _TF, min_size=71,
          mid=("block13_sepconv1_act", 728)),  # the end of the middle flow, stride 16
    _spec("inception_v3", "InceptionV3", "inception_v3", 299, 2048, "inception_v3" + _TF, min_size=75,
          mid=("mixed7", 768)),  # the end of the 17 x 17 stage, stride 16
    _spec("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 1536,
          "inception_resnet_v2" + _TF, min_size=75),
    _spec("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048, "resnet50v2" + _TF),
    _spec("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048, "resnet101v2" + _TF),
    _spec("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048, "resnet152v2" + _TF),
    _spec("densenet121", "DenseNet121", "densenet", 224, 1024, "densenet121" + _TF),
    _spec("densenet169", "DenseNet169", "densenet", 224, 1664, "densenet169" + _TF),
    _spec("densenet201", "DenseNet201", "densenet", 224, 1920, "densenet201" + _TF),
    *[_spec(f"efficientnet_b{i}", f"EfficientNetB{i}", "efficientnet", size, width, _EFF.format(f"b{i}"))
      for i, (size, width) in enumerate([(224, 1280), (240, 1280), (260, 1408), (300, 1536),
                                         (380, 1792), (456, 2048), (528, 2304), (600, 2560)])],
    *[_spec(f"efficientnet_v2_{v.lower()}", f"EfficientNetV2{v}", "efficientnet_v2", size, width,
            _V2.format(v.lower()))
      for v, size, width in [("B0", 224, 1280), ("B1", 240, 1280), ("B2", 260, 1408),
                             ("B3", 300, 1536), ("S", 384, 1280), ("M", 480, 1280), ("L", 480, 1280)]],
    *[_spec(f"convnext_{v.lower()}", f"ConvNeXt{v}", "convnext", 224, width,
            f"convnext_{v.lower()}_notop.h5")
      for v, width in [("Tiny", 768), ("Small", 768), ("Base", 1024), ("Large", 1536), ("XLarge", 2048)]],
    _spec("nasnet_large", "NASNetLarge", "nasnet", 331, 4032, "nasnet_large_no_top.h5"),
    _spec("nasnet_mobile", "NASNetMobile", "nasnet", 224, 1056, "nasnet_mobile_no_top.h5"),
    _spec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280,
          "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576,
          "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960,
          "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
]}

def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, else ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve_weights(spec: BackboneSpec, weights: str, seed: int = 0) -> WeightsSource:
    """Find the weight file for `weights` = 'imagenet', 'random' or a folder of .h5 files."""
    if weights == "random":
        return WeightsSource("random", None, f"random:seed={seed}")
    if weights == "imagenet":
        cached = keras_cache_dir() / spec.weights_file
        if cached.exists():
            return WeightsSource("imagenet", cached, f"sha256:{file_sha256(cached)}")
        return WeightsSource("imagenet", None, "imagenet:download")
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise UserError(f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing folder. "
                        f"Pass a folder holding the Keras .h5 weight files (e.g. {spec.weights_file}).")
    path = folder / spec.weights_file
    if not path.exists():
        raise UserError(
            f"The weights folder {folder} has no {spec.weights_file}, the file Keras publishes for "
            f"{spec.constructor} without its top. Download it where you have internet (it is what "
            f"keras.applications.{spec.constructor}(include_top=False) saves to ~/.keras/models/) "
            f"and copy it into {folder}."
        )
    return WeightsSource("file", path, f"sha256:{file_sha256(path)}")


def offline_message(specs: list[BackboneSpec], cause: BaseException | None = None) -> str:
    files = ", ".join(s.weights_file for s in specs)
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return (
        f"Could not download the ImageNet weights{why}. This machine seems to be offline and the "
        f"Keras cache {keras_cache_dir()} lacks {files}. Fix: on a machine with internet, build the "
        f"backbones once (or download those files from the Keras applications release page), then "
        f"either copy the files into {keras_cache_dir()} (or $KERAS_HOME/models) or into a folder "
        f"you pass as --weights WEIGHTS_DIR. For a smoke test without weights use --weights random."
    )


def bind(spec: BackboneSpec, source: WeightsSource) -> BackboneSpec:
    """The spec as these weights have it: a keras.applications model is the same whatever its weights."""
    return spec


def settings(spec: BackboneSpec) -> dict:
    """The store settings this builder adds: its preprocessing, exactly as stores have recorded it."""
    return {"preprocess": spec.preprocessing.record()}


def build(spec: BackboneSpec, source: WeightsSource, image_size: int, seed: int = 0):
    """Build the headless, average-pooled Keras model, frozen, with the given weights."""
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=(image_size, image_size, 3))
    if source.kind == "random":
        keras.utils.set_random_seed(seed)
        model = constructor(weights=None, **kwargs)
    elif source.kind == "imagenet" and source.path is None:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints "Downloading data from ..."
            model = constructor(weights="imagenet", **kwargs)
    else:
        model = constructor(weights=str(source.path), **kwargs)
    model.trainable = False
    return model

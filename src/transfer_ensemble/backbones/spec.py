"""What every backbone builder shares: a backbone's spec (settings as data), its preprocessing
and where its weights come from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transfer_ensemble import plugins

DECODE = "opencv-imdecode-rgb;area-or-linear-resize"


@dataclass(frozen=True)
class Preprocessing:
    """How float32 RGB pixels in [0, 255] become the model's input, as data: a keras.applications
    module's ``preprocess_input`` (`module`), or ``(x * rescale - mean) / std`` per channel."""

    module: str = ""
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def record(self) -> str:
        """The description stored in each store's meta.json (a change recomputes the features)."""
        if self.module:  # the string every keras.applications store has carried since version 2
            return f"{DECODE};keras-preprocess_input-in-graph;flip=lr"
        return (f"{DECODE};(x*{self.rescale!r}-mean)/std-in-graph;mean={list(self.mean)!r};"
                f"std={list(self.std)!r};flip=lr")

    def function(self) -> Callable:
        """The preprocessing as a function of float32 [0, 255] tensors (any backend, traceable)."""
        import keras

        if self.module:
            return getattr(keras.applications, self.module).preprocess_input
        import numpy as np

        scale = np.asarray([self.rescale / s for s in self.std], dtype=np.float32)
        offset = np.asarray([-m / s for m, s in zip(self.mean, self.std)], dtype=np.float32)
        return lambda x: keras.ops.add(keras.ops.multiply(x, scale), offset)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: the builder that makes it (a module of ``backbones.BUILDERS``), its native
    input size and the multiple a size must be, its pooled width, its preprocessing, and the
    builder's own settings (keras.applications: `constructor` and `weights_file`; keras_hub:
    `family`, `pooling` and `arch`, the architecture built for --weights random). `mid_layer`
    names a middle layer whose average-pooled output (`mid_width` wide) is stored beside the
    final features when the extraction asks for it (``--mid-layer``); "" where none is declared."""

    name: str
    builder: str
    size: int
    width: int
    preprocessing: Preprocessing
    min_size: int = 32
    size_multiple: int = 1
    constructor: str = ""
    weights_file: str = ""
    family: str = ""
    pooling: str = "avg"
    arch: dict = field(default_factory=dict, hash=False, compare=False)
    mid_layer: str = ""
    mid_width: int = 0

    def __post_init__(self) -> None:
        plugins.check_name("backbone", self.name)

    @property
    def module(self) -> str:
        """The keras.applications module whose ``preprocess_input`` this backbone uses."""
        return self.preprocessing.module

    def fit_size(self, size: int) -> int:
        """`size` rounded to the nearest multiple of `size_multiple` (a ViT's patch size); the
        native size stays as published (SigLIP 2's 384 px with 14 px patches: the patch embedding
        drops the remainder, as the preset was trained)."""
        if self.size_multiple <= 1 or size == self.size:
            return size
        return max(self.size_multiple, int(round(size / self.size_multiple)) * self.size_multiple)


@dataclass(frozen=True)
class WeightsSource:
    """Where one backbone's weights come from, and an identity that changes when they do. `format`
says how a folder of weights is written (keras_hub: "keras", "transformers" or "timm"); "" where
the kind says it all."""

    kind: str
    path: Path | None
    identity: str
    format: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Kinds of head: each fits a classifier on one fold's features, predicts, saves and loads itself.

`HEADS` maps the name `--head` takes to a `HeadKind`. Cross-validation, `predict` and the report
use only this interface, so a new kind of head is one entry here and its options in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from transfer_ensemble import backend
from transfer_ensemble.config import HEAD_KINDS, HeadOptions


@dataclass(frozen=True)
class HeadKind:
    """One kind of head. `fit` returns the model and its history (per-epoch curves, if any)."""

    name: str
    suffix: str
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, Any, int], tuple[Any, dict]]
    predict: Callable[[Any, np.ndarray], np.ndarray]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]


def _build_seed_head(n_features: int, n_classes: int, options: HeadOptions):
    import keras

    model = keras.Sequential([
        keras.Input(shape=(n_features,)),
        keras.layers.Dropout(options.dropout),
        keras.layers.Dense(n_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(options.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _fit_seed_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   n_classes: int, options: HeadOptions, seed: int):
    """The paper's head: dropout then a dense softmax, Adam, early stopping on the validation
    loss with the best weights restored. Deterministic for a given seed."""
    import keras

    backend.enable_determinism()
    keras.utils.set_random_seed(seed)
    model = _build_seed_head(x_train.shape[1], n_classes, options)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                         restore_best_weights=True)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=options.epochs,
                        batch_size=options.batch_size, callbacks=[stop], shuffle=True, verbose=0)
    curves = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    curves["best_epoch"] = int(np.argmin(curves["val_loss"])) + 1
    curves["epochs_run"] = len(curves["val_loss"])
    return model, curves


def _predict_keras(model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def _save_keras(model, path: Path) -> None:
    model.save(path)


def _load_keras(path: Path):
    import keras

    return keras.saving.load_model(path)


HEADS: dict[str, HeadKind] = {
    "seed": HeadKind("seed", ".keras", _fit_seed_head, _predict_keras, _save_keras, _load_keras),
}
assert tuple(HEADS) == HEAD_KINDS, "config.HEAD_KINDS must list the registered heads"


def get(name: str) -> HeadKind:
    return HEADS[name]

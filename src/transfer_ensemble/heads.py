"""The classifier head: dropout then a dense softmax layer, trained with Adam and early stopping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadConfig:
    epochs: int = 50
    patience: int = 5
    dropout: float = 0.5
    batch_size: int = 128
    learning_rate: float = 1e-3


def build_head(n_features: int, n_classes: int, config: HeadConfig):
    import keras

    model = keras.Sequential([
        keras.Input(shape=(n_features,)),
        keras.layers.Dropout(config.dropout),
        keras.layers.Dense(n_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             n_classes: int, config: HeadConfig, seed: int):
    """Train one head; returns the model with its best-validation-loss weights and the history."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_head(x_train.shape[1], n_classes, config)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                         restore_best_weights=True)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=config.epochs,
                        batch_size=config.batch_size, callbacks=[stop], shuffle=True, verbose=0)
    curves = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    curves["best_epoch"] = int(np.argmin(curves["val_loss"])) + 1
    curves["epochs_run"] = len(curves["val_loss"])
    return model, curves


def predict(model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)

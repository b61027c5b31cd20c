"""The `seed` head (the paper's): dropout and a dense softmax layer, trained with Adam and early
stopping on the validation fold. ``--head seed`` reproduces the paper's submission. Saved as ``model.keras``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer_ensemble import backend
from transfer_ensemble.heads.base import FitReport, Views, n_classes_of
from transfer_ensemble.options import check_self, option, real, whole


@dataclass(frozen=True)
class SeedOptions:
    """The `seed` head (the paper's): dropout and a dense softmax layer, trained with Adam and early stopping."""

    epochs: int = option(50, "--epochs", "most epochs per head (default 50)", whole(1))
    patience: int = option(5, "--patience", "early-stopping patience in epochs (default 5)", whole(1))
    dropout: float = option(0.5, "--dropout", "dropout before the softmax layer (default 0.5)",
                            real(0, 1, below=True, why=" (the fraction of features dropped)"))
    batch_size: int = option(128, "--head-batch-size", "head training batch size (default 128)", whole(1))
    learning_rate: float = option(1e-3, "--learning-rate", "Adam learning rate (default 0.001)",
                                  real(0, 1, above=True, why=" (Adam learning rates are typically 1e-4 to 1e-2)"))

    def __post_init__(self) -> None:
        check_self(self)


def _build_seed_head(n_features: int, n_classes: int, options: SeedOptions):
    import keras

    model = keras.Sequential([
        keras.Input(shape=(n_features,)),
        keras.layers.Dropout(options.dropout),
        keras.layers.Dense(n_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(options.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _fit_seed_head(train: Views, y_train: np.ndarray, val: Views, y_val: np.ndarray, n_classes: int,
                   options: SeedOptions, seed: int):
    """The paper's head: dropout then a dense softmax, Adam, early stopping on the validation
    loss with the best weights restored. Deterministic for a given seed. Several views are
    trained on as more rows."""
    import keras

    backend.enable_determinism()
    keras.utils.set_random_seed(seed)
    x_train, x_val = np.concatenate(train), np.concatenate(val)
    y_train, y_val = np.tile(y_train, len(train)), np.tile(y_val, len(val))
    model = _build_seed_head(x_train.shape[1], n_classes, options)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                         restore_best_weights=True)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=options.epochs,
                        batch_size=options.batch_size, callbacks=[stop], shuffle=True, verbose=0)
    curves = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    best_epoch = int(np.argmin(curves["val_loss"])) + 1
    epochs_run = len(curves["val_loss"])
    return model, FitReport(summary=f"best epoch {best_epoch} of {epochs_run}", curves=curves,
                            best_epoch=best_epoch, epochs_run=epochs_run)


def _predict_keras(model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


class SeedHead:
    """The seed head as an estimator: ``SeedHead(epochs=50, ...).fit(...)``, then ``predict_proba``."""

    def __init__(self, epochs: int = 50, patience: int = 5, dropout: float = 0.5, batch_size: int = 128,
                 learning_rate: float = 1e-3, n_classes: int | None = None):
        self.options = SeedOptions(epochs, patience, dropout, batch_size, learning_rate)
        self.n_classes = n_classes
        self.model_ = None

    def fit(self, train_views: Views, y: np.ndarray, val_views: Views, y_val: np.ndarray, seed: int) -> FitReport:
        self.model_, report = _fit_seed_head(train_views, y, val_views, y_val, n_classes_of(self.n_classes, y, y_val),
                                             self.options, seed)
        return report

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _predict_keras(self.model_, x)

    def save(self, path: Path) -> None:
        self.model_.save(path)

    @classmethod
    def load(cls, path: Path) -> "SeedHead":
        import keras

        head = cls()
        head.model_ = keras.saving.load_model(path)
        head.n_classes = head.model_.output_shape[-1]
        return head

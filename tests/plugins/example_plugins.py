"""A user's plug-ins, as a module of their own: a head, a view and an engine, registered on import.

The tests import it in-process and name it to the CLI with ``--plugins example_plugins`` (with
this folder on PYTHONPATH), as a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

from sklearn.neighbors import KNeighborsClassifier

from transfer_ensemble import engines, heads, views
from transfer_ensemble.engines.local import LocalEngine
from transfer_ensemble.heads.sklearn import sklearn_head

MARKER = "EXAMPLE_PLUGINS_ENGINE_LOG"
"""Where the engine appends a line per call, when the variable is set."""

HEAD = heads.register(sklearn_head("plugin_knn", lambda: KNeighborsClassifier(3)))
VIEW = views.register(views.View("center_half", 13, crop=views.Crop(0.5)))


class LoggingEngine(LocalEngine):
    """The local engine, noting each call in the file $EXAMPLE_PLUGINS_ENGINE_LOG."""

    def extract_split(self, extractor, split, *args, **kwargs):
        _note(f"extract {split}")
        return super().extract_split(extractor, split, *args, **kwargs)

    def score(self, scorer, stores, n, tta, chunk):
        _note(f"score {n}")
        yield from super().score(scorer, stores, n, tta, chunk)


def _note(line: str) -> None:
    if os.environ.get(MARKER):
        with open(Path(os.environ[MARKER]), "a") as f:
            f.write(line + "\n")


engines.register("plugin_engine", f"{__name__}:LoggingEngine")

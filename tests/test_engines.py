"""An engine registered from outside the package is accepted by --engine's check and runs
extraction and scoring: the engines registry is the only list of engines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import make_kaggle
from transfer_ensemble import engines, workflow
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.engines.local import LocalEngine

CALLS: list[str] = []


class CountingEngine(LocalEngine):
    """The local engine, recording each call: a stand-in for an engine a user adds."""

    def extract_split(self, extractor, split, *args, **kwargs):
        CALLS.append(f"extract {split}")
        return super().extract_split(extractor, split, *args, **kwargs)

    def score(self, scorer, stores, n, tta, chunk):
        CALLS.append(f"score {n}")
        yield from super().score(scorer, stores, n, tta, chunk)


@pytest.fixture
def counting():
    engines.register("counting", f"{__name__}:CountingEngine")
    CALLS.clear()
    yield "counting"
    engines.unregister("counting")


def test_an_unregistered_engine_is_refused_with_the_registered_names():
    with pytest.raises(UserError, match="'local', 'ray'"):
        EngineConfig(engine="counting")
    with pytest.raises(ValueError, match="already registered"):
        engines.register("local", "x:y")


@pytest.mark.slow
def test_a_registered_engine_extracts_and_scores_a_run_like_the_local_one(counting, tmp_path):
    from transfer_ensemble.predict import Run

    data = make_kaggle(tmp_path / "data", n_classes=3, per_class=4, n_test=3)
    run = tmp_path / "run"
    config = ExtractConfig(backbones=("mobilenet_v2",), weights="random", image_size=32, batch_size=8,
                           scales=(1.0,))
    workflow.extract(data, run, config, engine=EngineConfig(engine=counting))
    assert CALLS == ["extract train", "extract test"]
    workflow.train(run, {"head": "linear", "folds": 2})
    frame = pd.read_csv(workflow.submit(run, tmp_path / "sub.csv").submission)
    images = sorted((data / "test").iterdir())
    trained = Run.load(run)
    by_engine = trained.predict([str(p) for p in images], engine=counting)
    assert CALLS[-1] == f"score {len(images)}"
    expected = frame.set_index(frame.columns[0]).loc[[p.stem for p in images], trained.classes].to_numpy()
    np.testing.assert_allclose(by_engine, expected, atol=1e-6)

"""Each option declared once (issue 17 item 5) and refusals that name the option as the caller knows
it (issue 19 item 11): fast, no models."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import pytest

from transfer_ensemble import cli, engines, heads, workflow
from transfer_ensemble.config import ExtractConfig, TrainConfig, merged
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.heads.sklearn import sklearn_head
from transfer_ensemble.options import declared, option, python_overrides, whole

COMMAND_FLAGS = {"-h", "--help", "--data", "--run", "--out", "--config", "--heads", "--blend", "--time-limit"}
SECTIONS = {"extract": [ExtractConfig, EngineConfig], "train": [TrainConfig], "run": [ExtractConfig, TrainConfig,
                                                                                     EngineConfig]}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _parser_flags(command: str) -> list[str]:
    return [s for a in _subparser(command)._actions for s in a.option_strings
            if s.startswith("--") and not s.startswith("--no-")]


def _declared_flags(sections) -> set[str]:
    flags = set()
    for cls in sections:
        flags |= {meta.flag for _, _, meta in declared(cls) if meta.flag}
        if cls is TrainConfig:
            for entry in heads.HEADS.values():
                flags |= {meta.flag for _, _, meta in declared(entry.options) if meta.flag}
        if cls is EngineConfig:
            for engine in engines.ENGINES.values():
                flags |= {meta.flag for _, _, meta in declared(engine.options) if meta.flag}
    return flags


@pytest.mark.parametrize("command", sorted(SECTIONS))
def test_every_declared_option_is_one_flag_and_every_flag_an_option(command):
    flags = _parser_flags(command)
    assert len(flags) == len(set(flags)), "a flag added twice"
    assert set(flags) - COMMAND_FLAGS == _declared_flags(SECTIONS[command])


def test_flags_parse_into_the_override_dicts_under_config_names():
    args = cli.build_parser().parse_args(["run", "--batch-size", "4", "--head-batch-size", "16", "--seed", "3",
                                          "--no-tta", "--engine", "ray", "--actors", "2"])
    assert cli.extract_overrides(args)["batch_size"] == 4 and cli.extract_overrides(args)["seed"] == 3
    train = cli.train_overrides(args)
    assert train["batch_size"] == 16 and train["seed"] == 3 and train["tta"] is False and train["epochs"] is None
    assert cli.engine_config(args) == EngineConfig.of("ray", actors=2)


@dataclass(frozen=True)
class _EpochOptions:
    epochs: int = option(7, "--epochs", "epochs of the toy head", whole(1))
    neighbours: int = option(3, "--neighbours", "neighbours of the toy head", whole(1))


class _Centroids:
    """A scikit-learn-style classifier (fit, predict, classes_), kept tiny so this file needs no sklearn import."""

    def fit(self, x, y):
        self.classes_ = np.unique(y)
        self.centres_ = np.stack([x[y == c].mean(axis=0) for c in self.classes_])
        return self

    def predict(self, x):
        return self.classes_[np.argmin(((x[:, None] - self.centres_[None]) ** 2).sum(axis=2), axis=1)]


@pytest.fixture
def toy_head():
    entry = heads.register(sklearn_head("toy", lambda epochs, neighbours: _Centroids(), _EpochOptions))
    yield entry
    heads.unregister("toy")


def test_a_classifier_without_predict_proba_is_a_head(toy_head):
    x = np.array([[0.0, 0], [0, 1], [5, 5], [5, 6]], dtype=np.float32)
    model = toy_head.create(_EpochOptions(), n_classes=3)
    assert model.fit([x], np.array([0, 0, 2, 2]), [x[:1]], np.array([0]), 0).summary == "_Centroids"
    np.testing.assert_array_equal(model.predict_proba(x[[0, 3]]), [[1, 0, 0], [0, 0, 1]])


def test_two_heads_may_own_an_option_of_the_same_name(toy_head):
    toy = TrainConfig.from_json({"head": "toy", "epochs": 3})
    assert toy.options == _EpochOptions(epochs=3) and toy.pool_views
    assert TrainConfig.from_json({"head": "seed", "epochs": 4}).options.epochs == 4
    with pytest.raises(UserError, match=r"--neighbours 5 .*is an option of --head toy, not of --head seed"):
        TrainConfig.from_json({"head": "seed", "neighbours": 5}, "f.json")
    with pytest.raises(UserError, match=r"--epochs 3 .*option of --head seed or --head toy, not of --head linear"):
        TrainConfig.from_json({"head": "linear", "epochs": 3}, "f.json")
    assert _parser_flags("train").count("--epochs") == 1
    args = cli.build_parser().parse_args(["train", "--run", "r", "--head", "toy", "--neighbours", "5"])
    assert cli.train_config(args).options == _EpochOptions(neighbours=5)
    with pytest.raises(UserError, match=r"--neighbours 5 \(given on the command line\) is an option of --head toy"):
        cli.train_config(cli.build_parser().parse_args(["train", "--run", "r", "--neighbours", "5"]))


@pytest.mark.parametrize("key, close", [("fold", "folds"), ("learning_rat", "learning_rate"), ("bogus_key", None)])
def test_workflow_train_refuses_an_unknown_key_naming_the_close_match(tmp_path, key, close):
    with pytest.raises(UserError) as info:
        workflow.train(tmp_path, {key: 3})
    message = str(info.value)
    assert repr(key) in message and "workflow.train(..., overrides)" in message and "is not an option" in message
    assert (f"did you mean {close!r}" in message) if close else "'folds'" in message


def test_a_python_callers_bad_value_names_the_parameter_and_the_call(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"extract": {}, "train": {"folds": 3}}))
    with pytest.raises(UserError) as info:
        workflow.train(tmp_path, {"folds": 1})
    message = str(info.value)
    assert "folds=1 (given to workflow.train(..., overrides))" in message and "command line" not in message
    with pytest.raises(UserError, match=r"epochs=3 \(given to f\(\)\) is an option of --head seed"):
        merged(TrainConfig, {}, python_overrides({"epochs": 3}, "f()"))


def test_merged_refuses_unknown_extract_keys():
    with pytest.raises(UserError, match=r"'image_sise'.*did you mean 'image_size'"):
        merged(ExtractConfig, {}, python_overrides({"image_sise": 80}, "g()"))


def test_run_config_is_merged_once(tmp_path, monkeypatch):
    """`run` hands train the TrainConfig it built (not its flattened dict, merged again)."""
    calls = {}
    monkeypatch.setattr(workflow, "extract", lambda *a, **k: [])
    monkeypatch.setattr(workflow, "train", lambda run, overrides, **k: calls.setdefault("train", overrides) and
                        workflow.TrainResult("x", {}, []))
    monkeypatch.setattr(workflow, "submit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    args = cli.build_parser().parse_args(["run", "--data", "d", "--run", str(tmp_path), "--out", "o.csv",
                                          "--head", "seed", "--epochs", "2"])
    with pytest.raises(KeyboardInterrupt):
        cli.cmd_run(args)
    assert calls["train"] == TrainConfig(head="seed", options=heads.SeedOptions(epochs=2))


def test_workflow_extract_takes_a_dict_of_options_or_none_like_train(tmp_path, monkeypatch):
    from conftest import make_kaggle
    from transfer_ensemble import features

    data = make_kaggle(tmp_path / "data", per_class=2, n_test=1)
    seen = []

    def stop(config, scale=1.0):
        seen.append(config)
        raise UserError("stopped before extracting")

    monkeypatch.setattr(features, "Extractor", stop)
    for config in ({"backbones": "mobilenet_v2", "image_size": 40, "weights": "random"}, None):
        with pytest.raises(UserError, match="stopped before extracting"):
            workflow.extract(data, tmp_path / "run", config)
    assert seen == [ExtractConfig(backbones=("mobilenet_v2",), image_size=40, weights="random"), ExtractConfig()]
    with pytest.raises(UserError, match=r"'image_sise' \(given to workflow.extract\(..., config\)\) is not an "
                                        r"option: did you mean 'image_size'"):
        workflow.extract(data, tmp_path / "run", {"image_sise": 40})
    with pytest.raises(UserError, match=r"workflow.extract\(..., config\) takes a dict of option names"):
        workflow.extract(data, tmp_path / "run", "xception")
    assert not (tmp_path / "run").exists()


def test_workflow_submit_and_blend_refuse_bad_arguments_in_the_clis_words(tmp_path):
    with pytest.raises(UserError, match=r"out=None \(given to workflow.submit\) must be the path of the "
                                        r"submission CSV to write \(--out\)"):
        workflow.submit(tmp_path, None)
    with pytest.raises(UserError, match=r"parts=3 \(given to workflow.blend\) must be a list of head recipe names"):
        workflow.blend(tmp_path, 3)

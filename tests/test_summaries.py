"""What the commands say: every command's --help description, and the summaries printed from the
typed results (`features.ExtractSummary`, `predict.PredictResult`), the layout `extract` found
and the report's one "wrote" line. No model is built here."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from conftest import make_folders, make_kaggle
from test_report import make_run
from transfer_ensemble import cli, features
from transfer_ensemble.features import Counts, ExtractSummary
from transfer_ensemble.predict import PredictResult

BOTH = {"xception": Counts(120, 0), "inception_v3": Counts(120, 0)}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_a_description_in_its_help(command):
    description = _subcommands()[command].description
    assert description and len(description.split()) >= 10, f"`{command} --help` says only its usage"


def test_extract_summary_names_the_scale_and_backbones_and_counts_each_image_once(capsys):
    results = [ExtractSummary(split, n, n, 0, 10.0, 12.0, BOTH, scale)
               for scale in (1.0, 2.0) for split, n in (("train", 120), ("test", 40))]
    cli.print_extract_summary(results)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["split", "images", "computed", "reused", "seconds", "images/s", "scale",
                                "backbones"]
    assert [line.split() for line in lines[2:6]] == [
        ["train", "120", "120", "0", "10.0", "12.0", "1x", "xception,inception_v3"],
        ["test", "40", "40", "0", "10.0", "4.0", "1x", "xception,inception_v3"],
        ["train", "120", "120", "0", "10.0", "12.0", "2x", "xception,inception_v3"],
        ["test", "40", "40", "0", "10.0", "4.0", "2x", "xception,inception_v3"]]
    assert lines[6] == "extracted the features of 160 images at 2 scales in 40.0 s"


def test_extract_summary_of_a_cache_hit_says_nothing_was_computed(capsys):
    cli.print_extract_summary([ExtractSummary("train", 12, 0, 12, 0.1, 0.1, {"xception": Counts(0, 12)})])
    out = capsys.readouterr().out
    assert out.splitlines()[2].split() == ["train", "12", "0", "12", "0.1", "-", "1x", "xception"]
    assert out.splitlines()[-1] == "all features were already computed: reused them"


def _predicted(views: tuple[str, ...], tta: bool) -> PredictResult:
    return PredictResult(Path("p.csv"), 3, 2, "probabilities", 5, 10, views, tta, "linear", 3, 0, 1.0, 2.0,
                         Path("cache"), {"a": 2, "b": 1})


@pytest.mark.parametrize("views, tta, said", [
    (("original", "flipped"), True, "(original + flipped views)"),
    (("original", "flipped", "center", "center_flipped"), True, "(original + flipped + center + center_flipped views)"),
    (("original",), False, "(original view only, --no-tta)"),
    (("original",), True, "(original view only: the recipe scores no other)"),
])
def test_predict_summary_names_the_views_the_recipe_scored(capsys, views, tta, said):
    cli.print_predict(_predicted(views, tta))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith(f"the average of 10 models of head recipe linear {said}")


@pytest.fixture
def no_extraction(monkeypatch):
    monkeypatch.setattr(features, "extract_split",
                        lambda extractor, split, paths, *a, **k: ExtractSummary(split, len(paths), 0, len(paths),
                                                                                0.0, 0.0, {}))


@pytest.mark.parametrize("layout, make, said", [
    ("kaggle", make_kaggle, "is in the Kaggle layout (labels.csv, train/, test/, sample_submission.csv): 12 "
                            "training images of 3 classes, 5 test images (to submit)"),
    ("folders", make_folders, "is in the folder layout (train/<class>/, test/)"),
])
def test_extract_names_the_layout_it_found(tmp_path, caplog, no_extraction, layout, make, said):
    data = make(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="transfer_ensemble"):
        assert cli.main(["extract", "--data", str(data), "--run", str(tmp_path / "run"), "--weights", "random",
                         "--backbones", "xception", "--image-size", "75"]) == 0
    assert f"data: {data} {said}" in caplog.text


def test_report_says_once_what_it_wrote(tmp_path, capsys, caplog):
    run = make_run(tmp_path, n_classes=3, per_class=4, folds=2)
    with caplog.at_level(logging.INFO, logger="transfer_ensemble"):
        assert cli.main(["report", "--run", str(run)]) == 0
    said = capsys.readouterr().out + caplog.text
    assert said.count("wrote") == 1 and f"wrote {run / 'report.html'}" in said


def test_tta_help_promises_no_particular_views():
    """--tta scores the recipe's views, which may be crops: its help names no fixed pair."""
    predict = _subcommands()["predict"]
    tta = next(a for a in predict._actions if "--tta" in a.option_strings)
    assert "flipped" not in tta.help and "every view the recipe scores" in tta.help

"""`make demo`: its own small settings (one scale, a small image size), said on screen before the
workflow runs. The workflow's steps are replaced here by ones that record what they were given."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script
from transfer_ensemble import workflow
from transfer_ensemble.features import Counts, ExtractSummary

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_script():
    return load_script("demo")


def test_make_demo_runs_the_script_with_its_own_settings():
    target = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/demo.py" in target and "--scales" not in target and "--image-size" not in target


def test_demo_extracts_one_small_scale_and_says_so_first(demo_script, tmp_path, monkeypatch, capsys):
    seen = {}

    def extract(data, run, config, **kwargs):
        seen["extract"] = config
        print("extracting")
        return [ExtractSummary("train", 120, 120, 0, 1.0, 1.0, {"xception": Counts(120, 0)})]

    monkeypatch.setattr(workflow, "extract", extract)
    monkeypatch.setattr(workflow, "train", lambda run, overrides, **k: workflow.TrainResult("linear", {}, []))
    monkeypatch.setattr(workflow, "submit", lambda run, out, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        demo_script.main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"),
                          "--out", str(tmp_path / "sub.csv")])
    config = seen["extract"]
    assert config.scales == (1.0,) and config.image_size == demo_script.DEMO_IMAGE_SIZE <= 160
    out = capsys.readouterr().out
    settings = f"demo settings: --scales 1 --image-size {demo_script.DEMO_IMAGE_SIZE} "
    assert settings in out and out.index(settings) < out.index("extracting")

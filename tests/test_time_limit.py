"""`--time-limit` (budget.py, plan.py): durations, the first pass that fits, and a run on a fake
clock that stops before the limit and records a plan `run --config` repeats."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from transfer_ensemble import budget, cli, plan, workflow
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.options import COMMAND_LINE, Overrides
from transfer_ensemble.runfolder import RunFolder

from conftest import make_kaggle


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("90s", 90), ("1h", 3600), ("1h30m", 5400),
                                           ("2.5m", 150), ("10", 600), (" 1h 5m 3s ", 3903), ("15min", 900)])
def test_durations(text, seconds):
    assert plan.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "15x", "-5m", "0", "m"])
def test_bad_durations_are_refused_with_the_flag_and_the_forms(text):
    with pytest.raises(UserError, match=r"--time-limit .*(15m, 90s, 1h or 1h30m)"):
        plan.parse_duration(text)


def test_the_first_pass_shrinks_to_fit_and_too_short_a_limit_computes_nothing():
    # 100 images at 1 image/s: 100 s at 1x, 56 s at 0.75x, 25 s at 0.5x; train budgeted at 40 s, 20 s margin.
    assert budget.first_share(plan.Speed(1.0), 100, 1000, 0, True) == 1.0
    assert budget.first_share(plan.Speed(1.0), 100, 140, 0, True) == 0.75
    assert budget.first_share(plan.Speed(1.0), 100, 110, 0, True) == 0.5
    assert budget.first_share(plan.Speed(1.0), 100, 130, 0, False) == 1.0  # no train to leave room for
    with pytest.raises(UserError, match=r"too short for 100 images .* Allow at least 85 s"):
        budget.first_share(plan.Speed(1.0), 100, 60, 0, True)
    smaller = budget.shrunk(ExtractConfig(backbones=("xception",), scales=(1.0, 2.0)), 0.75)
    assert smaller.image_size == 224 and smaller.scales == (1.0,)


def test_the_plan_line_says_each_pass_and_the_total():
    line = plan.Plan((plan.Pass(1.0, 1400, 280.0), plan.Pass(2.0, 1400, 1120.0)), plan.Speed(5.0)).describe()
    assert line == ("plan: 2 passes (1x 1400 images ~4.7 min, 2x 1400 images ~18.7 min), about 23.3 min on this "
                    "machine (measured: 5.00 images/s at 1x; other scales by their pixels)")
    assert plan.Speed(5.0).seconds(2.0, 1400) == pytest.approx(1120.0)
    assert plan.Speed(5.0).at(2.0).seconds(2.0, 1400) == pytest.approx(1120.0)


class FakeClock:
    """Seconds that pass only when the wrapped steps say so: a pass takes its images over RATE,
    times its pixels; a train TRAIN seconds."""

    RATE, TRAIN = 1.0, 30.0

    def __init__(self) -> None:
        self.now = 0.0
        self.measured = 0  # forward-pass timings taken

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    extract, train = workflow.extract, workflow.train

    def timed_extract(data, run, config, **kwargs):
        results = extract(data, run, config, **kwargs)
        out = []
        for r in results:
            seconds = r.computed / clock.RATE * r.scale ** 2
            clock.now += seconds
            out.append(replace(r, seconds=seconds))
        return out

    def timed_train(*args, **kwargs):
        clock.now += clock.TRAIN
        return train(*args, **kwargs)

    def measure(extractor, paths, specs=None):
        clock.measured += 1
        return plan.Speed(clock.RATE, extractor.scale)

    monkeypatch.setattr(plan, "measure", measure)
    monkeypatch.setattr(workflow, "extract", timed_extract)
    monkeypatch.setattr(workflow, "train", timed_train)
    return clock


EXTRACT = {"weights": "random", "image_size": 75, "batch_size": 16, "scales": "1,2", "backbones": "xception"}
TRAIN = {"head": "linear", "folds": 2}  # the plan, not the candidates, is under test here (test_heads has those)


def test_the_plan_stops_before_the_limit_and_run_config_repeats_it(tmp_path, fake):
    # 24 images: 24 s at 1x, then a 30 s train; 2x would take 96 s and a train budgeted at 4 x 30 s: 290 s in all
    data = make_kaggle(tmp_path / "data", per_class=6, n_test=6)
    run, out, limit = tmp_path / "run", tmp_path / "sub.csv", 200
    done = budget.run_within(limit, data, run, ExtractConfig(**{**EXTRACT, "scales": (1.0, 2.0)}),
                             Overrides(TRAIN, COMMAND_LINE), out, folds=2, clock=fake)
    assert done.scales == [1.0] and done.left_out == [2.0] and fake.now <= limit
    recorded = RunFolder(run).read_config()
    assert recorded["extract"]["scales"] == [1.0]
    assert recorded["plan"]["scales"] == [1.0] and recorded["plan"]["time_limit_seconds"] == limit
    assert [step["pass"] for step in recorded["plan"]["steps"]] == [1.0]
    assert recorded["heads"] == done.trained.recipe == done.submitted.recipe

    again, again_out = tmp_path / "again", tmp_path / "again.csv"
    assert cli.main(["run", "--config", str(run / "config.json"), "--run", str(again), "--out", str(again_out)]) == 0
    repeated = RunFolder(again).read_config()
    assert repeated["extract"]["scales"] == [1.0] and "plan" not in repeated
    assert repeated["heads"] == recorded["heads"] and repeated["train"] == recorded["train"]
    np.testing.assert_allclose(pd.read_csv(again_out).iloc[:, 1:].to_numpy(), pd.read_csv(out).iloc[:, 1:].to_numpy(),
                               atol=1e-6)


def test_extract_within_a_limit_says_its_plan_and_adds_the_scales_that_fit(tmp_path, fake, caplog):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)  # 8 images: 8 s at 1x, 32 s at 2x
    config = ExtractConfig(**{**EXTRACT, "scales": (1.0, 2.0)})
    with caplog.at_level("INFO", logger="transfer_ensemble"):
        done = budget.run_within(50, data, tmp_path / "run", config, None, None, clock=fake)
    assert done.scales == [1.0] and done.left_out == [2.0] and fake.now <= 50
    assert fake.measured == 1, "the extraction reuses the speed the plan measured"
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:")]
    assert len(plans) == 1 and plans[0].startswith("plan: 1 pass (1x 8 images ~"), plans
    caplog.clear()
    fake.now = 0.0
    with caplog.at_level("INFO", logger="transfer_ensemble"):
        done = budget.run_within(200, data, tmp_path / "run", config, None, None, clock=fake)
    assert done.scales == [1.0, 2.0] and RunFolder(tmp_path / "run").read_config()["extract"]["scales"] == [1.0, 2.0]
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:")]
    assert len(plans) == 1 and plans[0].startswith("plan: 1 pass (2x 8 images ~"), "the 1x pass is not planned again"


def test_a_bar_inside_a_job_shows_the_whole_jobs_eta(monkeypatch):
    import io
    import time

    from transfer_ensemble import progress

    with progress.job(120.0, expected=2.0):
        bar = progress.bar(total=10, file=io.StringIO(), mininterval=0)
    assert isinstance(bar, progress.JobBar)
    time.sleep(0.05)
    bar.update(5)  # about 100 images/s measured, 50 times the expected 2/s: the later work rescales to 2.4 s
    assert bar.postfix.startswith("job ETA 00:0")
    bar.close()
    assert not isinstance(progress.bar(total=1, file=io.StringIO()), progress.JobBar)


def test_the_plan_of_an_added_view_costs_its_own_pass_not_the_pairs(tmp_path, fake, caplog):
    data = make_kaggle(tmp_path / "data", per_class=2, n_test=2)  # 8 images: 8 s for every view at 1 image/s
    config = ExtractConfig(**{**EXTRACT, "scales": (1.0,)})
    workflow.extract(data, tmp_path / "run", config)
    with caplog.at_level("INFO", logger="transfer_ensemble"):
        workflow.extract(data, tmp_path / "run", replace(config, views=("original", "flipped", "center",
                                                                       "center_flipped")))
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:")]
    assert plans == ["plan: 1 pass (1x 8 images ~4 s), about 4 s on this machine (measured: 1.00 images/s at 1x; "
                     "other scales by their pixels)"], "the pair is cached: the centre crop's pass is half the work"

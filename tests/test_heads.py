"""Head kinds, calibration and blending (issue 9): each head round-trips through its file, the
linear head solves scikit-learn's problem, nothing reads test labels, and the default recipe
(linear head, pooled views, TTA, two scales, temperature) runs end to end beside the paper's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_TRAIN, TINY, make_folders, make_kaggle, run_cli, run_in_process
from transfer_ensemble import ensemble, heads, workflow
from transfer_ensemble.config import ExtractConfig
from transfer_ensemble.heads import linear, solver
from transfer_ensemble.recipes import select_recipe
from transfer_ensemble.runfolder import RunFolder

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def _blobs(n: int = 240, d: int = 16, k: int = 4, seed: int = 0, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(size=(k, d)) * spread
    x = (rng.normal(size=(n, d)) + centers[y]).astype(np.float32)
    return np.abs(x), y


# ---- the linear head ---------------------------------------------------------------------------

def test_the_linear_solver_finds_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs()
    theta, _ = solver.fit_multinomial(x, y, 4, c=0.1, tol=1e-7, max_iter=2000)
    ours = solver.softmax(x @ theta[:-4].reshape(16, 4) + theta[-4:])
    theirs = LogisticRegression(C=0.1, tol=1e-10, max_iter=5000).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)  # float32 products: agreement to ~1e-4


def test_the_linear_head_never_looks_at_the_validation_rows():
    x, y = _blobs()
    a, b = heads.LinearHead(), heads.LinearHead()
    report = a.fit([x, x[:, ::-1]], y, [x[:10]], y[:10], 3)
    b.fit([x, x[:, ::-1]], y, [x[10:40] * 5], y[10:40][::-1], 3)
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    assert report.chosen["C"] in linear.C_GRID and report.search and report.summary == f"C {report.chosen['C']}"


def test_an_absent_class_gets_a_column_and_almost_no_probability():
    x, y = _blobs(k=4)
    keep = y != 2
    model = heads.get("linear").create(n_classes=4)
    model.fit([x[keep]], y[keep], [x[:4]], y[:4], 0)
    p = model.predict_proba(x)
    assert p.shape == (len(x), 4) and p[:, 2].max() < 1e-3
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)


@pytest.mark.backend
@pytest.mark.parametrize("head", ["linear", pytest.param("seed", marks=pytest.mark.slow)])
def test_each_head_saves_loads_and_predicts_the_same(head, tmp_path):
    x, y = _blobs()
    kind = heads.get(head)
    model = kind.create(heads.SeedOptions(epochs=3) if head == "seed" else None)
    model.fit([x[:200]], y[:200], [x[200:]], y[200:], 0)
    path = tmp_path / f"model{kind.suffix}"
    model.save(path)
    np.testing.assert_array_equal(kind.load(path).predict_proba(x), model.predict_proba(x))


# ---- calibration and blending ----------------------------------------------------------------

def test_a_temperature_fitted_on_over_confident_predictions_lowers_their_log_loss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    logits = rng.normal(size=(2000, 5))
    logits[np.arange(2000), y] += 1.0
    calibrated = ensemble.calibrate(solver.softmax(logits), 1.0)
    over = ensemble.calibrate(calibrated, 1 / 3)  # the same ranking, three times too sharp
    t = ensemble.fit_temperature(y, over)
    assert 2.4 < t < 3.6
    assert ensemble.score(y, ensemble.calibrate(over, t))["log_loss"] < 0.8 * ensemble.score(y, over)["log_loss"]
    assert ensemble.calibrate(over, t).argmax(axis=1).tolist() == over.argmax(axis=1).tolist()


def test_blend_weights_are_fitted_on_oof_and_never_worse_than_the_best_part():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    good = np.full((600, 3), 0.1)
    good[np.arange(600), y] = 0.8
    noise = rng.dirichlet(np.ones(3), 600)
    weights = ensemble.fit_blend_weights(y, [good, noise])
    assert abs(sum(weights) - 1) < 1e-9 and min(weights) >= 0 and weights[0] > 0.8
    mixed = ensemble.score(y, ensemble.blend([good, noise], weights))["log_loss"]
    assert mixed <= ensemble.score(y, good)["log_loss"] + 1e-9


@pytest.mark.parametrize("folds", [2, 3])
def test_block_selection_keeps_the_informative_block_whatever_the_recipes_folds(folds):
    """The selection runs on its own folds (selection.FOLDS, 2 inner for its nested check)."""
    from transfer_ensemble import selection
    from transfer_ensemble.config import TrainConfig

    x, y = _blobs(n=60, d=8, k=3, spread=3.0)
    noise = np.abs(np.random.default_rng(1).normal(size=x.shape)).astype(np.float32)
    features = {"good": {"original": x, "flipped": x[:, ::-1].copy()}, "noise": {"original": noise,
                                                                              "flipped": noise}}
    config = TrainConfig(head="linear", folds=folds)
    chosen = selection.select(config, features, ("noise", "good"), ("original", "flipped"), y, 3)
    assert "good" in chosen.chosen and chosen.path[0][0] == "good"
    assert len(chosen.fold_choices) == selection.FOLDS and all(chosen.fold_choices)
    assert np.isfinite(chosen.nested_log_loss) and chosen.images == 60
    assert selection.Selection.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen
    assert json.loads(json.dumps(chosen.to_json())) == chosen.to_json(), "recipe.json's record compares equal"


# ---- whole runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_choice_reads_the_test_labels(tmp_path):
    """The same run twice, the second with its hold-out labels shuffled: every choice is the same."""
    data = make_folders(tmp_path / "data", n_classes=3, per_class=6, n_valid=0, n_test=3)
    config = ExtractConfig(backbones=("xception",), weights="random", image_size=TINY, batch_size=8, scales=(1.0,))
    first, second = tmp_path / "a", tmp_path / "b"
    workflow.extract(data, first, config)
    shutil.copytree(first, second)
    record = json.loads((second / "dataset.json").read_text())
    labels = [item["label"] for item in record["test"]]
    shuffled = labels[1:] + labels[:1]
    assert shuffled != labels
    for item, label in zip(record["test"], shuffled):
        item["label"] = label
    (second / "dataset.json").write_text(json.dumps(record))
    results = [workflow.train(run, {"head": "linear", "folds": 2}) for run in (first, second)]
    a, b = (r.metrics for r in results)
    assert a["calibration"]["temperature"] == b["calibration"]["temperature"]
    assert [r["chosen"]["C"] for r in a["oof"]["per_fold"]] == [r["chosen"]["C"] for r in b["oof"]["per_fold"]]
    assert a["oof"] == b["oof"]
    assert a["holdout"]["ensemble"]["log_loss"] != b["holdout"]["ensemble"]["log_loss"], "labels were not shuffled"
    recipe = results[0].recipe
    assert select_recipe(RunFolder(first), recipe).blocks == select_recipe(RunFolder(second), recipe).blocks
    for group in select_recipe(RunFolder(first), recipe).groups:
        np.testing.assert_array_equal(np.load(first / "heads" / recipe / f"oof_{group}.npy"),
                                      np.load(second / "heads" / recipe / f"oof_{group}.npy"))


@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory):
    """A run extracted at two scales, trained with --head seed, then with --head linear."""
    base = tmp_path_factory.mktemp("heads")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=5)
    run = base / "run"
    extract = run_cli("extract", "--data", str(data), "--run", str(run), "--weights", "random",
                      "--image-size", str(TINY), "--batch-size", "8")
    assert extract.returncode == 0, extract.stderr
    seed = run_in_process("train", "--run", str(run), *FAST_TRAIN)
    assert seed.returncode == 0, seed.stderr
    seed_sub = run_in_process("submit", "--run", str(run), "--out", str(base / "seed.csv"))
    default = run_in_process("train", "--run", str(run), "--head", "linear", "--folds", "2")
    assert default.returncode == 0, default.stderr
    default_sub = run_in_process("submit", "--run", str(run), "--out", str(base / "default.csv"))
    return data, run, base, seed_sub, default, default_sub


@pytest.mark.slow
def test_seed_then_linear_each_followed_by_submit(two_recipes):
    data, run, base, seed_sub, default, default_sub = two_recipes
    assert seed_sub.returncode == 0 and "head recipe seed-folds2-epochs3-patience2" in seed_sub.stdout
    assert default_sub.returncode == 0, default_sub.stderr
    name = "linear-folds2"
    assert f"head recipe {name}" in default_sub.stdout, "submit uses the recipe trained last"
    assert "temperature" in default.stdout and "(fitted on OOF)" in default.stdout
    folder = RunFolder(run)
    recipe = select_recipe(folder, name)
    assert recipe.groups == ("pooled",) and recipe.scored_views("pooled") == ("original", "flipped")
    candidates = ("xception", "xception.mid", "inception_v3", "inception_v3.mid", "xception@2x",
                  "xception.mid@2x", "inception_v3@2x", "inception_v3.mid@2x")
    inputs = json.loads((recipe.folder / "recipe.json").read_text())["inputs"]
    chosen = inputs["selection"]
    assert set(inputs["features"]) == set(chosen["chosen"]), "the recipe records the chosen blocks only"
    assert tuple(chosen["candidates"]) == candidates, "the linear head chooses among every extracted block"
    assert recipe.blocks.sources == tuple(chosen["chosen"]) and set(recipe.blocks.sources) <= set(candidates)
    assert recipe.blocks.sources, "at least one block is chosen"
    assert select_recipe(folder, "seed-folds2-epochs3-patience2").blocks.sources == ("xception", "inception_v3")
    assert json.loads((run / "features" / "train" / "xception@2x" / "meta.json").read_text())["image_size"] == 150
    seed_frame, default_frame = (pd.read_csv(base / f"{n}.csv") for n in ("seed", "default"))
    assert list(seed_frame.columns) == list(default_frame.columns)
    assert not np.allclose(seed_frame.iloc[:, 1:].to_numpy(), default_frame.iloc[:, 1:].to_numpy())


@pytest.mark.slow
def test_predict_with_the_linear_recipe_equals_its_submission(two_recipes, tmp_path):
    data, run, base, *_ = two_recipes
    out = tmp_path / "preds.csv"
    result = run_cli("predict", "--run", str(run), "--images", str(data / "test"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    preds = pd.read_csv(out)
    preds["id"] = preds["image"].map(lambda p: Path(p).stem)
    sub = pd.read_csv(base / "default.csv", dtype={"id": str}).set_index("id")
    preds = preds.set_index("id").loc[sub.index]
    np.testing.assert_allclose(preds[sub.columns].to_numpy(), sub.to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_a_blend_of_the_two_recipes(two_recipes, tmp_path):
    _, run, *_ = two_recipes
    refused = run_cli("train", "--run", str(run), "--blend", "seed-folds2-epochs3-patience2,nope")
    assert refused.returncode == 2 and "'nope' is not a trained, current head recipe" in refused.stderr
    result = run_cli("train", "--run", str(run), "--blend", "seed-folds2-epochs3-patience2,linear-folds2")
    assert result.returncode == 0, result.stderr
    blend = select_recipe(RunFolder(run))
    assert blend.name == "blend-seed-folds2-epochs3-patience2+linear-folds2"
    assert abs(sum(blend.weights) - 1) < 1e-9
    submitted = run_cli("submit", "--run", str(run), "--out", str(tmp_path / "blend.csv"))
    assert submitted.returncode == 0 and f"head recipe {blend.name}" in submitted.stdout
    assert run_cli("report", "--run", str(run)).returncode == 0
    assert blend.name in (run / "report.html").read_text()


@pytest.mark.slow
def test_the_default_train_trains_both_heads_blends_them_and_uses_the_lowest_oof(two_recipes, tmp_path):
    """No --head: the seed head (its own options from the command line) and the linear head, their
    blend, and the run's recipe is the one of the three with the lowest OOF log loss; a one-head
    train afterwards is a one-head run again. Runs after the tests above: it changes the run's recipe."""
    _, run, *_ = two_recipes
    seed, linear = "seed-folds2-epochs3-patience2", "linear-folds2"
    done = sorted(p for name in (seed, linear) for p in (run / "heads" / name).rglob("done.json"))
    assert done
    stamps = [p.stat().st_mtime_ns for p in done]
    result = run_cli("train", "--run", str(run), "--folds", "2", "--epochs", "3", "--patience", "2")
    assert result.returncode == 0, result.stderr
    assert [p.stat().st_mtime_ns for p in done] == stamps, "finished fold models of both heads were reused"
    folder = RunFolder(run)
    losses = {name: select_recipe(folder, name).metrics()["oof"]["ensemble"]["log_loss"]
              for name in (seed, linear, f"blend-{seed}+{linear}")}
    best = min(losses, key=losses.get)
    config = json.loads((run / "config.json").read_text())
    assert set(config["choose"]) == {"seed", "linear"} and config["heads"] == best
    assert result.stdout.startswith(f"chose {best} by OOF log loss ({losses[best]:.4f}")
    assert all(f"{name} {losses[name]:.4f}" in result.stdout.splitlines()[0] for name in losses if name != best)
    assert f"head recipe {best}:" in result.stdout
    assert select_recipe(folder).name == best
    submitted = run_cli("submit", "--run", str(run), "--out", str(tmp_path / "chosen.csv"))
    assert submitted.returncode == 0 and f"head recipe {best}" in submitted.stdout, submitted.stderr

    one = run_cli("train", "--run", str(run), "--head", "linear", "--folds", "2")
    assert one.returncode == 0, one.stderr
    config = json.loads((run / "config.json").read_text())
    assert "choose" not in config and config["heads"] == linear and not one.stdout.startswith("chose")


@pytest.mark.slow
def test_real_xception_features_beat_chance_with_the_linear_head(dogs3, tmp_path):
    if not (SHARED_WEIGHTS / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").exists():
        pytest.skip(f"needs Xception's ImageNet weights, which are not in {SHARED_WEIGHTS} on this machine")
    data = tmp_path / "dogs"
    for class_dir in sorted(p for p in (dogs3 / "train").iterdir() if p.is_dir()):
        (data / "train" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:6]:
            (data / "train" / class_dir.name / image.name).symlink_to(image)
    (data / "test").mkdir()
    for image in sorted((dogs3 / "test").rglob("*.jpg"))[:4]:
        (data / "test" / image.name).symlink_to(image)
    run = tmp_path / "run"
    config = ExtractConfig(backbones=("xception",), weights=str(SHARED_WEIGHTS), image_size=TINY, batch_size=16)
    workflow.extract(data, run, config)
    result = workflow.train(run, {"head": "linear", "folds": 3})
    assert result.recipe == "linear-folds3"
    assert result.metrics["oof"]["ensemble"]["log_loss"] < 0.5 * np.log(3)
    assert not result.metrics["warnings"]
    submitted = workflow.submit(run, tmp_path / "sub.csv")
    frame = pd.read_csv(submitted.submission)
    assert len(frame) == 4 and np.allclose(frame.iloc[:, 1:].sum(axis=1), 1, atol=1e-6)


# ---- a head kind registered from outside the package ---------------------------------------------

@pytest.fixture
def knn_head():
    """Any scikit-learn classifier is a head in one line (heads.sklearn); registered for this test only."""
    from sklearn.neighbors import KNeighborsClassifier

    from transfer_ensemble.heads.sklearn import sklearn_head

    entry = heads.register(sklearn_head("knn", lambda: KNeighborsClassifier(3)))
    yield entry
    heads.unregister("knn")


def test_the_sklearn_adapter_saves_loads_and_fills_absent_classes(knn_head, tmp_path):
    x, y = _blobs(k=4)
    keep = y != 1
    model = knn_head.create(n_classes=4)
    report = model.fit([x[keep], x[keep][:, ::-1]], y[keep], [x[:4]], y[:4], 0)
    assert report.summary == "KNeighborsClassifier"
    p = model.predict_proba(x)
    assert p.shape == (len(x), 4) and p[:, 1].max() == 0 and np.allclose(p.sum(axis=1), 1)
    model.save(tmp_path / f"model{knn_head.suffix}")
    np.testing.assert_array_equal(knn_head.load(tmp_path / f"model{knn_head.suffix}").predict_proba(x), p)


@pytest.mark.slow
def test_a_registered_toy_head_trains_reports_and_submits_a_recipe(knn_head, tmp_path):
    data = make_kaggle(tmp_path / "data", n_classes=3, per_class=4, n_test=3)
    run = tmp_path / "run"
    workflow.extract(data, run, ExtractConfig(backbones=("mobilenet_v2",), weights="random", image_size=32,
                                              batch_size=8, scales=(1.0,)))
    result = workflow.train(run, {"head": "knn", "folds": 2})
    assert result.recipe == "knn-folds2"
    rows = result.metrics["oof"]["per_fold"]
    assert [r["summary"] for r in rows] == ["KNeighborsClassifier"] * 2 and "calibration" in result.metrics
    assert (run / "heads" / "knn-folds2" / "pooled" / "fold0" / "model.pkl").exists()
    frame = pd.read_csv(workflow.submit(run, tmp_path / "sub.csv").submission)
    assert len(frame) == 3 and np.allclose(frame.iloc[:, 1:].sum(axis=1), 1, atol=1e-6)
    assert "Fold models" in (run / "report.html").read_text()

"""The three steps over a run folder: extract features, train a head recipe, write the submission.

Each step holds the run folder's lock, reads what earlier steps recorded there (`runfolder`,
`recipes`, `store`), and records its own results only once it has succeeded, so any step can be
killed and run again, and a failed step leaves the run as it was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transfer_ensemble import backend, engines, ensemble, images, plan, plugins, progress, submission, views
from transfer_ensemble.blocks import Blocks, blocks_for, views_record
from transfer_ensemble.config import (CANDIDATE_HEADS, ExtractConfig, TrainConfig, head_option_owners, merged,
                                      option_names)
from transfer_ensemble.dataset import Dataset, Item, check_folds, empty_classes, load_dataset
from transfer_ensemble.engines import EngineConfig, engine_config
from transfer_ensemble.errors import UserError
from transfer_ensemble.heads import FitReport
from transfer_ensemble.options import Overrides, python_overrides, refuse_unknown
from transfer_ensemble.recipes import (Blend, Recipe, RecipeStatus, blend_folder, blend_name, list_recipes,
                                       recipe_for, recipe_statuses, select_recipe, unregistered_recipes, write_blend)
from transfer_ensemble.records import DamagedFile, labels_digest, load_json
from transfer_ensemble.runfolder import SPLITS, RunData, RunFolder
from transfer_ensemble.scoring import blend_test_probabilities, test_probabilities
from transfer_ensemble.storage import disk_errors, write_json
from transfer_ensemble.store import source_key

if TYPE_CHECKING:
    from transfer_ensemble.features import ExtractSummary
    from transfer_ensemble.selection import Selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What `train` or `blend` did: the head recipe (or blend) it trained, its metrics as its
    metrics.json records them, and the status of every recipe of the run, best first."""

    recipe: str
    metrics: dict
    statuses: list[RecipeStatus]
    candidates: dict[str, float] = field(default_factory=dict)
    """For the default `train`: each candidate recipe it trained (the heads of CANDIDATE_HEADS and
    their blend) with its OOF log loss; `recipe` is the lowest."""


@dataclass(frozen=True)
class SubmitResult:
    """What `submit` wrote: the submission file, its size, the models averaged into it and the
    recipe they belong to, and the hold-out score where the test images are labelled."""

    submission: Path
    rows: int
    classes: int
    models: int
    recipe: str
    holdout: dict | None = None


def _check_images(run: RunFolder, dataset: Dataset,
                  max_pixels: int) -> tuple[dict[str, list[str]], dict[str, list[tuple[Item, str]]]]:
    """Read every image once: its content hash, and whether it decodes (cached by content).

    Returns the content hashes and the bad images, per split.
    """
    items = {split: dataset.split(split) for split in SPLITS}
    paths = [it.path for split in SPLITS for it in items[split]]
    known = run.read_image_check()
    results = iter(images.inspect_all(paths, known, max_pixels))
    keys: dict[str, list[str]] = {split: [] for split in SPLITS}
    bad: dict[str, list[tuple[Item, str]]] = {split: [] for split in SPLITS}
    verdicts = {}
    for split in SPLITS:
        for item in items[split]:
            result = next(results)
            keys[split].append(result.sha256)
            if result.sha256 is not None and result.cacheable:
                verdicts[result.sha256] = result.reason
            if result.reason is not None:
                bad[split].append((item, result.reason))
    if verdicts != known:
        run.write_image_check(verdicts)
    return keys, bad


def _bad_image_error(bad: dict[str, list[tuple[Item, str]]]) -> UserError:
    pairs = [(it.path, reason) for split in bad for it, reason in bad[split]]
    return UserError(
        f"{len(pairs)} images cannot be decoded (no model was built, nothing was computed):\n"
        f"{images.listing(pairs)}\n"
        f"Fix or remove them, or pass --on-bad-image skip to leave bad training images out and give "
        f"bad test images the training class frequencies in the submission."
    )


def extract(data: str | Path, run_dir: str | Path, config: "ExtractConfig | dict | None" = None,
            folds: int | None = None, engine: EngineConfig | None = None,
            speed: plan.Speed | None = None) -> list[ExtractSummary]:
    """Check every image, then compute the features of the train and test splits; returns what
    each split's extraction at each scale did.

    `folds`, when training will follow (`run`), is checked against the class counts first, so a
    class too small for the folds stops the run before the long extraction rather than after.
    The run's records (config.json, dataset.json) change only once the features are complete.
    `engine` (default local; see ``engines``) says where the features are computed; the stores
    are the same. `config` is an ExtractConfig, or a dict of option names (e.g.
    ``{"backbones": "xception"}``) over the defaults; None is the defaults. `speed`, the forward
    pass's speed where the caller has just measured it (`budget`), is not measured again.
    """
    from transfer_ensemble import backend, features

    if not isinstance(config, ExtractConfig):
        config = merged(ExtractConfig, None, python_overrides(config, "workflow.extract(..., config)"))
    backend.check_available()
    where = engines.get(engine_config(engine))
    run = RunFolder(run_dir)
    dataset = load_dataset(data)
    log.info("data: %s", dataset.describe())
    extractors = [features.Extractor(config, scale) for scale in config.scales]
    with run.lock(), disk_errors(run.path):
        keys, bad = _check_images(run, dataset, config.max_pixels)
        if (bad["train"] or bad["test"]) and config.on_bad_image == "error":
            raise _bad_image_error(bad)
        bad_train = {it.path for it, _ in bad["train"]}
        keys["train"] = [k for it, k in zip(dataset.train, keys["train"]) if it.path not in bad_train]
        dataset.train = [it for it in dataset.train if it.path not in bad_train]
        _check_classes_left(dataset, bad["train"])
        if folds is not None:
            check_folds(dataset, folds)
        run_data = RunData(dataset, [it.id for it, _ in bad["test"]])
        bad_test = set(run_data.bad_test_ids)
        keys["test"] = [k for it, k in zip(dataset.test, keys["test"]) if it.id not in bad_test]
        if bad["train"] or bad["test"]:
            log.warning("--on-bad-image skip: left out %d bad training images%s; %d bad test images "
                        "get the training class frequencies in the submission%s. All are listed with "
                        "their reasons in %s.", len(bad["train"]), _named(bad["train"]),
                        len(bad["test"]), _named(bad["test"]), run.bad_images_path)
        splits = {"train": dataset.train, "test": run_data.good_test}
        jobs = [(extractor, split, items) for extractor in extractors for split, items in splits.items()]
        estimates = _estimates(run, config, jobs, engine_config(engine).engine == "local", speed)
        results = []
        for i, (extractor, split, items) in enumerate(jobs):
            expected = None if estimates is None else estimates[i][1]
            with progress.job(0.0 if estimates is None else sum(t for t, _ in estimates[i + 1:]), expected):
                summary = where.extract_split(extractor, split, [it.path for it in items], [it.id for it in items],
                                              keys[split], lambda name, split=split, s=extractor.scale:
                                              run.store(split, source_key(name, s)))
            results.append(replace(summary, scale=extractor.scale))
        run.write_bad_images({split: [{"id": it.id, "path": str(it.path), "reason": r} for it, r in bad[split]]
                              for split in bad})
        run.write_run_data(run_data)
        sources = [source_key(name, extractor.scale) for extractor in extractors for spec in extractor.specs
                   for name in extractor.store_names(spec)]
        used = {"view": plugins.used("view", config.views), "backbone": plugins.used("backbone", config.backbones),
                "engine": plugins.used("engine", [engine_config(engine).engine])}
        run.update_config(data=str(dataset.root), extract=config.to_json(), classes=dataset.classes,
                          features=run.store_settings(sources), plugins=used)
        return results


def _estimates(run: RunFolder, config: ExtractConfig, jobs: list, measured: bool, speed: plan.Speed | None
               ) -> list[tuple[float, float]] | None:
    """Each job's (split at a scale) estimated seconds and images/s on this machine, from `speed`,
    else the first scale's forward pass timed on the run's own images (`plan.measure`), after
    logging the plan line; None where nothing is left to compute or (`measured` false: another
    engine) the work runs elsewhere."""
    from transfer_ensemble.store import rows_done

    def left(extractor, split: str, items: list[Item], specs=None) -> int:
        ids = [it.id for it in items]
        done = [rows_done(run.store(split, source_key(name, extractor.scale)), ids, config.views)
                for spec in (extractor.specs if specs is None else specs) for name in extractor.store_names(spec)]
        return len(ids) - min(done, default=0)

    def share(extractor, split: str, items: list[Item]) -> float:
        """The share of the views' work still due: the passes (`views.whole_passes`) of the views
        some store lacks rows of (adding a crop to a run costs its pass, not the pair's)."""
        ids = [it.id for it in items]
        lacking = [view for view in config.views
                   if any(rows_done(run.store(split, source_key(name, extractor.scale)), ids, [view]) < len(ids)
                          for spec in extractor.specs for name in extractor.store_names(spec))]
        return len(views.whole_passes(config.views, lacking)) / len(config.views)

    todo = [left(extractor, split, items) for extractor, split, items in jobs]
    if not any(todo) or not measured:
        return None
    if speed is None:
        first = jobs[0][0]
        busy = [spec for spec in first.specs if any(left(e, split, items, [spec]) for e, split, items in jobs)]
        speed = plan.measure(first, [it.path for _, _, items in jobs for it in items], busy)
    shares = [share(extractor, split, items) if n else 1.0 for (extractor, split, items), n in zip(jobs, todo)]
    estimates = [(speed.seconds(extractor.scale, n) * part, speed.at(extractor.scale).rate / max(part, 1e-9))
                 for (extractor, _, _), n, part in zip(jobs, todo, shares)]
    passes: dict[float, tuple[int, float]] = {}
    for (extractor, _, _), n, (seconds, _) in zip(jobs, todo, estimates):
        images, total = passes.get(extractor.scale, (0, 0.0))
        passes[extractor.scale] = (images + n, total + seconds)
    log.info(plan.Plan(tuple(plan.Pass(s, n, t) for s, (n, t) in passes.items()), speed).describe())
    return estimates


def _named(bad: list[tuple[Item, str]], n: int = 5) -> str:
    if not bad:
        return ""
    names = ", ".join(it.path.name for it, _ in bad[:n])
    return f" ({names}{f' and {len(bad) - n} more' if len(bad) > n else ''})"


def _check_classes_left(dataset: Dataset, bad_train: list[tuple[Item, str]]) -> None:
    """After leaving bad training images out, every class must still have an image."""
    empty = empty_classes(dataset)
    if empty:
        raise UserError(
            f"After leaving out the {len(bad_train)} bad training images (--on-bad-image skip), these "
            f"classes of {dataset.root} have no training image left: {', '.join(map(repr, empty[:8]))}. "
            f"The images left out, with the reason:\n"
            f"{images.listing([(it.path, reason) for it, reason in bad_train])}\n"
            f"Fix or replace them (or raise --max-pixels for images that are only too large)."
        )


def train_config_for(run: RunFolder, overrides: "dict | TrainConfig | None" = None,
                     heads: str | None = None) -> tuple[TrainConfig, Blocks]:
    """`train`'s options and the blocks it trains on: those of the recipe `heads` (its options with
    the options given on top, on the blocks it records), else the run's last options (the folds and
    the seed, and the head's options if it is the same head) with the options given on top, or
    `overrides` itself when it is a complete TrainConfig, on the blocks such a recipe sees in the
    run's extraction (`blocks.blocks_for`)."""
    if heads is None:
        config = overrides if isinstance(overrides, TrainConfig) else \
            run.train_config(python_overrides(overrides, "workflow.train(..., overrides)"))
        return config, blocks_for(run.extract_config(), config)
    match = [r for r in list_recipes(run) if r.name == heads]
    if not match:
        missing = [r for r in unregistered_recipes(run) if r.name == heads]
        if missing:
            raise UserError(missing[0].why(run))
        known = ", ".join(r.name for r in list_recipes(run)) or "none yet"
        raise UserError(f"--heads {heads!r}: the run {run.path} has no such head recipe (it has: {known}). "
                        f"Pass one of those names, or give the head options themselves.")
    if isinstance(overrides, TrainConfig):
        config = overrides
    else:
        config = merged(TrainConfig, match[0].config.to_json(),
                        python_overrides(overrides, "workflow.train(..., overrides)"),
                        source=str(match[0].record_path))
    return config, match[0].blocks


def train(run_dir: str | Path, overrides: "dict | TrainConfig | None" = None,
          heads: str | None = None, candidates: dict | None = None) -> TrainResult:
    """Train the run's best recipe by OOF, or (given a head or `heads`) one recipe.

    With no ``head`` in `overrides` and no `heads`, it trains each head of CANDIDATE_HEADS (each
    with the options given that are its own or every head's), blends them by their OOF
    predictions, and makes the candidate with the lowest OOF log loss the run's recipe
    (`TrainResult.candidates` lists them). Each starts from its options in `candidates` (head ->
    options, as config.json's "choose" records them; `run --config` passes that run's), else in
    the run's own "choose", else the defaults. Otherwise it trains (or finishes) one head recipe:
    the run's recorded options with `overrides` on top (a dict of option names, e.g.
    ``{"folds": 3}``; an unknown name is refused), or a TrainConfig.

    Other recipes trained on the run are kept beside it. Returns the recipe's name and metrics
    and every recipe's status.
    """
    backend.check_available()
    if not isinstance(overrides, TrainConfig):
        overrides = python_overrides(overrides, "workflow.train(..., overrides)")
        refuse_unknown(overrides, option_names(TrainConfig), overrides.origin)
        if heads is None and overrides.get("head") is None:
            return _train_candidates(run_dir, overrides, candidates)
    return _train_one(run_dir, overrides, heads)


def _candidate_overrides(overrides: Overrides) -> list[Overrides]:
    """The options of each head of CANDIDATE_HEADS: those given that are its own or every head's."""
    owners = head_option_owners()
    return [Overrides({**{k: v for k, v in overrides.items() if k not in owners or head in owners[k]}, "head": head},
                      overrides.origin) for head in CANDIDATE_HEADS]


def candidate_configs(overrides: Overrides, saved: dict | None = None,
                      source: str = "config.json") -> list[TrainConfig]:
    """Each candidate head's TrainConfig: `overrides` over its options in `saved` (head -> options,
    config.json's "choose", read from `source`) over the defaults. A `run` calls it before it
    extracts, so a bad option stops it before the long work."""
    saved = saved if isinstance(saved, dict) else {}
    return [merged(TrainConfig, saved.get(mine["head"]), mine, source, head_from_saved=False)
            for mine in _candidate_overrides(overrides)]


def _train_candidates(run_dir: str | Path, overrides: Overrides, candidates: dict | None) -> TrainResult:
    run = RunFolder.existing(run_dir, "train")
    source = "the candidates given to workflow.train" if candidates is not None else str(run.config_path)
    if candidates is None:
        with run.lock():
            candidates = run.read_config().get("choose")
    configs = candidate_configs(overrides, candidates, source)
    trained = [_train_one(run_dir, config, None).recipe for config in configs]
    mixed = blend(run_dir, trained)
    scores = {name: s.oof_log_loss for name in trained + [mixed.recipe]
              for s in mixed.statuses if s.recipe.name == name}
    best = min(scores, key=scores.get)
    with run.lock(), disk_errors(run.path):
        run.update_config(heads=best, choose={config.head: config.to_json() for config in configs})
        statuses = recipe_statuses(run)
        from transfer_ensemble.report import write_report

        write_report(run)
    metrics = next(s.metrics for s in statuses if s.recipe.name == best)
    log.info("the run's recipe is %s, the lowest OOF log loss of %s", best,
             ", ".join(f"{name} {loss:.4f}" for name, loss in scores.items()))
    return TrainResult(best, metrics, statuses, scores)


def _train_one(run_dir: str | Path, overrides: "Overrides | TrainConfig", heads: str | None) -> TrainResult:
    run = RunFolder.existing(run_dir, "train")
    with run.lock(), disk_errors(run.path):
        config, blocks = train_config_for(run, overrides, heads)
        run_data = run.read_run_data()
        dataset = run_data.dataset
        check_folds(dataset, config.folds)
        labels = run_data.labels
        chosen = _chosen_blocks(run, run_data, config, blocks, heads is not None)
        if chosen is not None:
            blocks = replace(blocks, sources=chosen.chosen)
        inputs = run.feature_inputs(blocks)
        recipe = recipe_for(run, config, blocks, {"features": inputs["features"], "train": inputs["train"],
                                                  "labels": labels_digest(labels), **views_record(blocks),
                                                  **({"selection": chosen.to_json()} if chosen else {})})
        features = _load_features(run, run_data, blocks)
        from transfer_ensemble.crossval import oof_metrics, train_recipe, training_warnings

        oof = train_recipe(run, recipe, features, labels, len(dataset.classes), inputs["test"])
        metrics = {"oof": oof_metrics(recipe, oof, labels)}
        temperature = 1.0
        if config.temperature:
            metrics["calibration"] = calibration(labels, ensemble.combine({g: [p] for g, p in oof.items()}))
            temperature = metrics["calibration"]["temperature"]
            metrics["oof"]["ensemble"] = metrics["calibration"]["after"]
        if dataset.test_is_labelled:
            metrics["holdout"] = _holdout_metrics(run, recipe, run_data, inputs["test"], temperature)
            if config.temperature:
                metrics["calibration"]["holdout_before"] = \
                    _holdout_metrics(run, recipe, run_data, inputs["test"], 1.0)["ensemble"]
                metrics["calibration"]["holdout_after"] = metrics["holdout"]["ensemble"]
        histories = [FitReport.from_history(load_json(recipe.fold(*job).history)) for job in recipe.jobs]
        metrics["warnings"] = training_warnings(recipe.name, metrics["oof"]["ensemble"]["log_loss"],
                                                len(dataset.classes), histories,
                                                getattr(config.options, "epochs", None))
        for warning in metrics["warnings"]:
            log.warning(warning)
        write_json(recipe.metrics_path, metrics)
        run.update_config(train=config.to_json(), heads=recipe.name, choose=None,
                          plugins={"head": plugins.used("head", [config.head])})
        from transfer_ensemble.report import write_report

        log.info("wrote the report %s", write_report(run))
        return TrainResult(recipe.name, metrics, recipe_statuses(run))


def _chosen_blocks(run: RunFolder, run_data: RunData, config: TrainConfig, blocks: Blocks,
                   recorded_only: bool) -> "Selection | None":
    """The blocks of `blocks` a recipe of `config` trains on, chosen by OOF (`selection`), where it
    selects them (``select_blocks``) among more than one: the recipe's recorded choice while it was
    made from the same candidates, labels and options, else a new one; None where it does not
    select. With `recorded_only` (retraining a named recipe on the blocks it records), only the
    recorded choice is looked up."""
    from transfer_ensemble import selection

    record = recipe_for(run, config, blocks).record_path
    try:
        recorded = load_json(record).get("inputs", {}).get("selection") if record.exists() else None
        recorded = selection.Selection.from_json(recorded) if recorded else None
    except (DamagedFile, KeyError, TypeError, ValueError, AttributeError):
        recorded = None
    if recorded_only:
        return recorded if recorded is not None and recorded.chosen == blocks.sources else None
    if not config.select_blocks or config.blocks or len(blocks.sources) < 2:
        return None
    labels = run_data.labels
    key = selection.selection_key(run.feature_inputs(blocks), labels_digest(labels), config)
    if recorded is not None and recorded.key == key:
        log.info("%s (chosen before, from the same candidates)", recorded.describe())
        return recorded
    log.info("choosing %s's feature blocks among %d by out-of-fold log loss (with a nested check of how "
             "much the choosing flatters it)", config.head, len(blocks.sources))
    features = {}
    for name in blocks.sources:
        loaded = _load_features(run, run_data, replace(blocks, sources=(name,)), splits=("train",))
        features[name] = {view: loaded[view]["train"] for view in blocks.views}
    chosen = selection.select(config, features, blocks.sources, blocks.views, labels, len(run_data.dataset.classes),
                              key)
    log.info(chosen.describe())
    return chosen


def calibration(labels: np.ndarray, oof: np.ndarray) -> dict:
    """The temperature fitted on the OOF ensemble, and its OOF score before and after."""
    temperature = ensemble.fit_temperature(labels, oof)
    return {"temperature": temperature, "before": ensemble.score(labels, oof),
            "after": ensemble.score(labels, ensemble.calibrate(oof, temperature))}


def blend(run_dir: str | Path, parts: "list[str] | str") -> TrainResult:
    """Mix trained recipes with weights fitted on their OOF predictions (never on test), then a
    temperature fitted on the mixed OOF predictions. The blend is kept beside the recipes and is
    what `submit` uses next. Returns its name, weights and metrics, and every recipe's status.
    `parts` is a list of recipe names, or one string of them separated by commas, as --blend."""
    if isinstance(parts, str):
        parts = [name.strip() for name in parts.split(",") if name.strip()]
    if not isinstance(parts, (list, tuple)) or not all(isinstance(name, str) for name in parts):
        raise UserError(f"parts={parts!r} (given to workflow.blend) must be a list of head recipe names, or "
                        f"one string of them separated by commas (--blend A,B).")
    run = RunFolder.existing(run_dir, "blend")
    with run.lock(), disk_errors(run.path):
        if len(parts) < 2 or len(set(parts)) != len(parts):
            raise UserError(f"--blend {','.join(parts)!r} must name two or more different head recipes of "
                            f"{run.path}, separated by commas.")
        statuses = {s.recipe.name: s for s in recipe_statuses(run)}
        for name in parts:
            status = statuses.get(name)
            if status is None or isinstance(status.recipe, Blend) or status.state != "current":
                known = ", ".join(n for n, s in statuses.items() if s.state == "current"
                                  and not isinstance(s.recipe, Blend)) or "none"
                raise UserError(f"--blend: {name!r} is not a trained, current head recipe of {run.path} "
                                f"(current ones: {known}). Train it first (`transfer-ensemble train --run "
                                f"{run.path} --head ...`), then blend.")
        recipes = [statuses[name].recipe for name in parts]
        run_data = run.read_run_data()
        labels = run_data.labels
        from transfer_ensemble.crossval import oof_probabilities

        oofs = [oof_probabilities(recipe, len(labels), len(run_data.dataset.classes)) for recipe in recipes]
        weights = ensemble.fit_blend_weights(labels, oofs)
        metrics = {"weights": dict(zip(parts, weights)),
                   "parts": {name: ensemble.score(labels, oof) for name, oof in zip(parts, oofs)}}
        metrics["calibration"] = calibration(labels, ensemble.blend(oofs, weights))
        metrics["oof"] = {"ensemble": metrics["calibration"]["after"]}
        result = Blend(blend_name(parts), parts, weights, {r.name: r.inputs for r in recipes},
                       blend_folder(run, parts))
        if run_data.dataset.test_is_labelled:
            probabilities = blend_test_probabilities(run, result, recipes, run_data,
                                                      metrics["calibration"]["temperature"])
            metrics["holdout"] = {"ensemble": ensemble.score(np.array([it.label for it in run_data.dataset.test]),
                                                             probabilities)}
        write_blend(result)
        write_json(result.metrics_path, metrics)
        run.update_config(heads=result.name)
        return TrainResult(result.name, metrics, recipe_statuses(run))


def _load_features(run: RunFolder, run_data: RunData, blocks: Blocks,
                   splits: tuple[str, ...] = SPLITS) -> dict[str, dict[str, np.ndarray]]:
    """view -> split -> the rows of `blocks`' sources side by side, in the run's image order."""
    from transfer_ensemble.store import load_features

    ids = {"train": [it.id for it in run_data.dataset.train], "test": [it.id for it in run_data.good_test]}
    try:
        return {view: {split: load_features(run.stores(split, blocks.sources), view, ids[split]) for split in splits}
                for view in blocks.views}
    except DamagedFile as exc:
        raise UserError(f"The features in {exc.path.parent if exc.path.suffix else exc.path} are not usable: "
                        f"{exc}. Run `transfer-ensemble extract --data DIR --run {run.path}` again: it "
                        f"recomputes what is missing or damaged.") from None


def _holdout_metrics(run: RunFolder, recipe: Recipe, run_data: RunData, test_identity: str,
                     temperature: float) -> dict:
    full, per_view = test_probabilities(run, recipe, run_data, test_identity, temperature)
    labels = np.array([it.label for it in run_data.dataset.test])
    good_labels = np.array([it.label for it in run_data.good_test])
    out = {view: ensemble.score(good_labels, p) for view, p in per_view.items()}
    out["ensemble"] = ensemble.score(labels, full)
    return out


def submit(run_dir: str | Path, out: str | Path, heads: str | None = None,
           record_out: bool = False) -> SubmitResult:
    """Combine a recipe's 2 x K test predictions into a validated submission CSV at `out`.

    The recipe is `heads`, else the run's current recipe with the lowest OOF log loss. With
    `record_out` (the `run` command), `out` is recorded in config.json once it is written.
    """
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise UserError(f"out={out!r} (given to workflow.submit) must be the path of the submission CSV to "
                        f"write (--out).")
    run = RunFolder.existing(run_dir, "submit")
    with run.lock(), disk_errors(out):
        run_data = run.read_run_data()
        recipe = select_recipe(run, heads)
        if isinstance(recipe, Blend):
            parts = [select_recipe(run, name) for name in recipe.parts]
            probabilities = blend_test_probabilities(run, recipe, parts, run_data, recipe.temperature)
            models = sum(len(part.jobs) for part in parts)
        else:
            test_identity = run.feature_inputs(recipe.blocks)["test"]
            probabilities, _ = test_probabilities(run, recipe, run_data, test_identity)
            models = len(recipe.jobs)
        dataset = run_data.dataset
        ids = [it.id for it in dataset.test]
        if run_data.bad_test_ids:
            log.warning("%d test rows could not be predicted (their images do not decode) and get the "
                        "training class frequencies: %s. See %s.", len(run_data.bad_test_ids),
                        ", ".join(run_data.bad_test_ids[:5]) + (" ..." if len(run_data.bad_test_ids) > 5 else ""),
                        run.bad_images_path)
        frame = submission.build(ids, dataset.classes, probabilities, dataset.id_column)
        path = submission.write(frame, out, ids, dataset.classes, dataset.id_column)
        holdout = ensemble.score(np.array([it.label for it in dataset.test]), probabilities) \
            if dataset.test_is_labelled else None
        if record_out:
            with disk_errors(run.path):
                run.update_config(out=str(out))
        return SubmitResult(path, len(ids), len(dataset.classes), models, recipe.name, holdout)

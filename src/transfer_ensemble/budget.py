"""`run --time-limit` and `extract --time-limit`: the passes that fit in the time a user has.

The plan is made as the work goes, from what this machine measures:

1. the forward pass at scale 1 is timed on a few of the run's images (`plan.measure`);
2. the first pass (scale 1, the paper's) runs at the largest share of the input size in
   `plan.FIRST_SHARES` whose extraction, and a `train` budgeted at `plan.TRAIN_SHARE` of the
   full-size pass, fit (a smaller share is recorded as --image-size, and no further scale is
   tried); where even the smallest does not fit, nothing is computed and the error says what
   would;
3. `train` follows (`run`), so a submission is ready however the rest goes;
4. each further scale, cheapest first (its pixels are its cost), is extracted only if its pass,
   estimated from the speed the last pass measured plus that extract's own overhead, and a
   `train` (the last one's measured time, times the growth of the candidate blocks squared) fit
   in what is left; `train` follows each;
5. `run` submits the recipe with the lowest OOF log loss.

What ran is recorded: the extraction's scales and size in config.json's "extract" (so
`run --config` repeats it exactly, with no limit) and the plan, with each pass's estimate and
measured time, in its "plan".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from transfer_ensemble import plan
from transfer_ensemble.config import ExtractConfig, TrainConfig
from transfer_ensemble.dataset import load_dataset
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.options import Overrides

if TYPE_CHECKING:
    from transfer_ensemble.features import ExtractSummary
    from transfer_ensemble.workflow import SubmitResult, TrainResult

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """What a time-limited run did: the scales extracted, those left out, each step's estimate and
    measured seconds, and the results of its last extract, train and submit."""

    limit: float
    image_size: int | None = None
    scales: list[float] = field(default_factory=list)
    left_out: list[float] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    extracted: list[ExtractSummary] = field(default_factory=list)
    trained: TrainResult | None = None
    submitted: SubmitResult | None = None

    def to_json(self) -> dict:
        return {"time_limit_seconds": self.limit, "image_size": self.image_size, "scales": self.scales,
                "left_out": self.left_out,
                "steps": self.steps}


def first_share(speed: plan.Speed, images: int, limit: float, elapsed: float, train: bool) -> float:
    """The largest share of the first pass's input size (`plan.FIRST_SHARES`) whose pass, with a
    `train` budgeted at `plan.TRAIN_SHARE` of the full-size pass, fits in `limit`, from `speed`
    at full size; UserError where none does."""
    full = speed.seconds(speed.scale, images)
    reserve = plan.TRAIN_SHARE * full if train else 0.0
    for share in plan.FIRST_SHARES:
        if plan.fits(elapsed, limit, speed.seconds(speed.scale * share, images), reserve):
            return share
    smallest = plan.FIRST_SHARES[-1]
    need = elapsed + speed.seconds(speed.scale * smallest, images) + reserve + plan.MARGIN_SECONDS
    raise UserError(f"--time-limit {plan.duration_text(limit)} is too short for {images} images on this machine: "
                    f"the smallest first pass ({smallest:g} of the input size) takes about "
                    f"{plan.duration_text(speed.seconds(speed.scale * smallest, images))}"
                    + (f" and training about {plan.duration_text(reserve)}" if train else "")
                    + f" (measured: {speed.rate:.2f} images/s at full size). Allow at least "
                      f"{plan.duration_text(need)}, or run on fewer images. Nothing was computed.")


def shrunk(config: ExtractConfig, share: float) -> ExtractConfig:
    """`config` at `share` of its input size (--image-size, else the backbones' largest native size),
    one scale."""
    from transfer_ensemble import backbones

    size = config.image_size or max(backbones.get_spec(name).size for name in config.backbones)
    return replace(config, image_size=int(round(size * share)), scales=(1.0,))


def run_within(limit: float, data: str | Path, run_dir: str | Path, config: ExtractConfig,
               train_overrides: "Overrides | TrainConfig | None", out: str | Path | None,
               engine: EngineConfig | None = None, folds: int | None = None, candidates: dict | None = None,
               clock: Callable[[], float] = time.monotonic) -> Budget:
    """Extract (and, with `train_overrides` not None, train after each pass as `workflow.train`
    with `candidates` does, and submit to `out`) within `limit` seconds, as the module's docstring
    says."""
    from transfer_ensemble import features, workflow
    from transfer_ensemble.runfolder import RunFolder

    start = clock()
    budget = Budget(limit)
    training = train_overrides is not None
    dataset = load_dataset(data)
    images = len(dataset.train) + len(dataset.test)
    base, later = 1.0, sorted(s for s in config.scales if s != 1.0)
    speed = plan.measure(features.Extractor(replace(config, scales=(base,)), base), [it.path for it in dataset.train])
    share = first_share(speed, images, limit, clock() - start, training)
    train_seconds = plan.TRAIN_SHARE * speed.seconds(base, images) if training else 0.0
    if share != 1.0:
        config = shrunk(config, share)
        log.warning("--time-limit: the first pass runs at %d px (%g of the input size) to leave time for "
                    "training; no further scale fits", config.image_size, share)
        speed, later = plan.Speed(speed.rate / share ** 2, base), []
    log.info("--time-limit %s: first pass about %s (measured %.2f images/s); each further scale (%s) only if "
             "it fits after it", plan.duration_text(limit),
             plan.duration_text(speed.seconds(base, images)), speed.rate,
             ", ".join(f"{s:g}x" for s in later) or "none")
    budget.image_size = config.image_size
    pending = [base] + later
    overhead = 0.0  # of an extract beyond its passes: the image check, the timing, building the models
    while pending:
        scale = pending.pop(0)
        estimate = speed.seconds(scale, images) + overhead
        if budget.scales:  # the candidate blocks grow with the scales, and the selection about with their square
            train_seconds *= ((len(budget.scales) + 1) / len(budget.scales)) ** 2
        if budget.scales and not plan.fits(clock() - start, limit, estimate, train_seconds):
            budget.left_out += [scale] + pending
            log.info("--time-limit: leaving out %s: the pass would take about %s and train about %s, with %s "
                     "left", ", ".join(f"{s:g}x" for s in [scale] + pending), plan.duration_text(estimate),
                     plan.duration_text(train_seconds), plan.duration_text(limit - (clock() - start)))
            break
        began = clock()
        budget.extracted = workflow.extract(data, run_dir, replace(config, scales=tuple(budget.scales + [scale])),
                                            folds=folds, engine=engine, speed=speed)
        took = clock() - began
        budget.scales.append(scale)
        step = {"pass": scale, "estimated_seconds": round(estimate, 1), "seconds": round(took, 1)}
        done = [r for r in budget.extracted if r.scale == scale and r.computed]
        if done and sum(r.seconds for r in done) > 0:
            speed = plan.Speed(sum(r.computed for r in done) / sum(r.seconds for r in done), scale)
        overhead = max(0.0, took - sum(r.seconds for r in budget.extracted))
        if training:
            began = clock()
            budget.trained = workflow.train(run_dir, train_overrides, candidates=candidates)
            train_seconds = clock() - began
            step["train_seconds"] = round(train_seconds, 1)
        budget.steps.append(step)
    if training and out is not None:
        budget.submitted = workflow.submit(run_dir, out, heads=budget.trained.recipe, record_out=True)
    run = RunFolder(run_dir)
    with run.lock():
        run.update_config(plan=budget.to_json())
    log.info("--time-limit %s: done in %s (scales %s%s)", plan.duration_text(limit),
             plan.duration_text(clock() - start), ", ".join(f"{s:g}x" for s in budget.scales),
             f"; left out {', '.join(f'{s:g}x' for s in budget.left_out)}" if budget.left_out else "")
    return budget

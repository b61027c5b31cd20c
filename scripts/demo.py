"""`make demo`: write the synthetic demo data, run the whole workflow, print the CV table.

The demo runs the default recipe at its own smaller settings (`DEMO_SCALES`, `DEMO_IMAGE_SIZE`:
one scale at about half the backbones' native size), said on screen, so that it takes a few
minutes on a CPU. Uses ImageNet weights when Keras has them cached or can download them;
otherwise says so and goes on with random weights, so the demo always runs end to end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tqdm.contrib.logging import logging_redirect_tqdm

from transfer_ensemble import cli, demo, noise, workflow
from transfer_ensemble.backbones import WeightsUnavailableError
from transfer_ensemble.errors import UserError
from transfer_ensemble.features import ExtractSummary
from transfer_ensemble.workflow import SubmitResult, TrainResult

DEMO_SCALES = "1"
DEMO_IMAGE_SIZE = 150
"""The demo's own settings: one scale at 150 px, about a twentieth of the pixels a real run's
defaults compute (--scales 1,2 at the backbones' native 299 px)."""


def run_workflow(run_args: list[str]) -> tuple[list[ExtractSummary], TrainResult, SubmitResult]:
    """extract (falling back to random weights when ImageNet's cannot be had), train, submit."""
    options = lambda: cli.build_parser().parse_args(["run", *run_args])
    args = options()
    try:
        results = workflow.extract(args.data, args.run, cli.extract_config(args))
    except WeightsUnavailableError as exc:
        print(f"\nImageNet weights are not available here, so the demo goes on with RANDOM weights: "
              f"the workflow runs end to end, but its scores say nothing about the backbones. The "
              f"demo's four classes are shapes of four colours, separable even by random features, "
              f"so expect a near-perfect score here that real photos would not get without ImageNet "
              f"weights.\n({exc})\n", file=sys.stderr)
        run_args += ["--weights", "random"]
        args = options()
        results = workflow.extract(args.data, args.run, cli.extract_config(args))
    trained = workflow.train(args.run, cli.train_overrides(args))
    return results, trained, workflow.submit(args.run, args.out, heads=trained.recipe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="demo_data", help="where to write the demo data set")
    parser.add_argument("--run", default="runs/demo", help="run folder")
    parser.add_argument("--out", default="submissions/demo.csv", help="submission to write")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE,
                        help=f"backbone input size (the demo's default {DEMO_IMAGE_SIZE}; the backbones' native 299)")
    parser.add_argument("--scales", default=DEMO_SCALES,
                        help=f"scales to extract at (the demo's default {DEMO_SCALES}; a real run's 1,2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    if not (Path(args.data) / "labels.csv").exists():
        summary = demo.write_demo_data(args.data)
        print(f"wrote the demo data to {args.data}: {summary['train']} training and {summary['test']} "
              f"test images of {len(summary['classes'])} classes")
    settings = ["--scales", args.scales, "--image-size", str(args.image_size)]
    print(f"demo settings: {' '.join(settings)} (smaller than a real run's defaults, --scales 1,2 at the "
          f"backbones' native 299 px, so that the demo takes minutes on a CPU; the recipe is the default's)")
    run_args = ["--data", args.data, "--run", args.run, "--out", args.out, *settings]
    try:
        with noise.filtered_stderr(), logging_redirect_tqdm():
            results, trained, result = run_workflow(run_args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cli.print_extract_summary(results)
    print()
    cli.print_train(trained)
    print()
    cli.print_submit(result)
    print(f"\nthe demo submission is at {Path(args.out).resolve()} (report: {Path(args.run) / 'report.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

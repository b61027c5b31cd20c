"""`make demo`: write the synthetic demo data, run the whole workflow, print the CV table.

Uses ImageNet weights when Keras has them cached or can download them; otherwise says so and
goes on with random weights, so the demo always runs end to end.
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


def run_workflow(run_args: list[str]) -> tuple[list[dict], dict, dict]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="demo_data", help="where to write the demo data set")
    parser.add_argument("--run", default="runs/demo", help="run folder")
    parser.add_argument("--out", default="submissions/demo.csv", help="submission to write")
    parser.add_argument("--image-size", type=int, default=None, help="override the native 299 px")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    if not (Path(args.data) / "labels.csv").exists():
        summary = demo.write_demo_data(args.data)
        print(f"wrote the demo data to {args.data}: {summary['train']} training and {summary['test']} "
              f"test images of {len(summary['classes'])} classes")
    run_args = ["--data", args.data, "--run", args.run, "--out", args.out]
    if args.image_size:
        run_args += ["--image-size", str(args.image_size)]
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

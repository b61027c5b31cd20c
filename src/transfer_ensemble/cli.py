"""The `transfer-ensemble` command line: parse arguments, call the workflow, print a summary.

Every option of config.py's dataclasses and of each head kind (heads/) becomes a flag here, from
its declaration: nothing in this file lists them. Nothing here imports TensorFlow, so `--help`,
validation errors and `submit` start instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from transfer_ensemble import __version__, backbones, noise, plugins, progress
from transfer_ensemble.config import ExtractConfig, TrainConfig, merged, upgrade
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.errors import UserError
from transfer_ensemble.heads import FitReport
from transfer_ensemble.options import COMMAND_LINE, Option, Overrides, declared

if TYPE_CHECKING:
    from transfer_ensemble.features import ExtractSummary
    from transfer_ensemble.predict import PredictResult
    from transfer_ensemble.workflow import SubmitResult, TrainResult

log = logging.getLogger("transfer_ensemble")

DATA_HELP = "data folder (Kaggle or folder layout)"
PLUGINS_HELP = (f"comma-separated Python modules to import first: plug-ins (heads, views, backbones, engines) "
                f"they register become options here (also ${plugins.ENV}; a run's own plug-ins are imported "
                f"from its config.json)")
HEADS_HELP = ("head recipe to use (default: the one the last `train` trained; 'best': the current "
              "recipe with the lowest OOF log loss)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def _declared(sections: Sequence[type]) -> list[tuple[str, Option, str | None]]:
    """(name, Option, argparse group title) of every option of `sections`: config dataclasses, with
    TrainConfig bringing every registered head kind's options in a group per kind, and EngineConfig
    every registered engine's."""
    from transfer_ensemble import engines, heads

    out = []
    for cls in sections:
        out += [(name, meta, meta.group) for name, _, meta in declared(cls)]
        if cls is TrainConfig:
            for entry in heads.HEADS.values():
                out += [(name, meta, f"--head {entry.name} options") for name, _, meta in declared(entry.options)]
        if cls is EngineConfig:
            for entry in engines.ENGINES.values():
                out += [(name, meta, f"--engine {entry.name} options") for name, _, meta in declared(entry.options)]
    return out


_TYPES = {"int": int, "real": float, "text": str}


def _add_options(p: argparse.ArgumentParser, sections: Sequence[type]) -> None:
    """One argparse option per flag declared by `sections` (an option two sections or two head kinds
    share, such as --seed or --epochs, is added once, with each help)."""
    by_flag: dict[str, list[tuple[str, Option, str | None]]] = {}
    for name, meta, group in _declared(sections):
        if meta.flag:
            by_flag.setdefault(meta.flag, []).append((name, meta, group))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, uses in by_flag.items():
        _, meta, group = uses[0]
        kinds = {use[1].rule.kind for use in uses}
        if len(kinds) > 1:
            raise ValueError(f"{flag} is declared with two types: {sorted(kinds)}")
        helps = list(dict.fromkeys(m.help() if callable(m.help) else m.help for _, m, _ in uses))
        owners = [g for _, _, g in uses if g]
        if len(set(owners)) > 1:
            helps.append("(" + ", ".join(g.removesuffix(" options") for g in dict.fromkeys(owners)) + ")")
        target = p if group is None else groups.setdefault(group, p.add_argument_group(group))
        if meta.rule.kind == "bool":
            target.add_argument(flag, dest=meta.dest, action=argparse.BooleanOptionalAction, help="; ".join(helps))
        else:
            target.add_argument(flag, dest=meta.dest, type=_TYPES[meta.rule.kind], help="; ".join(helps))


def _prescan(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in `argv` (``--flag VALUE`` or ``--flag=VALUE``), read before the parser
    exists: the plug-ins it imports add options to it."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _without_plugins(argv: Sequence[str]) -> list[str]:
    """`argv` less --plugins and its value wherever they are: they were read before parsing."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--plugins":
            skip = True
        elif not arg.startswith("--plugins="):
            out.append(arg)
    return out


TIME_LIMIT_HELP = ("finish within DURATION (e.g. 15m, 90s, 1h30m): {what}, as this machine measures them; "
                   "the plan is recorded, so `run --config` repeats it (docs/time-limit.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer-ensemble",
        description="Frozen ImageNet backbones (Xception + InceptionV3), original and flipped views, "
                    "a K-fold ensemble of softmax heads, and a Kaggle submission.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log warnings and errors only, and show no progress bars")
    parser.add_argument("--plugins", metavar="MODULES", help=PLUGINS_HELP + "; may also follow the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="compute backbone features of the train and test images",
                       description="Checks every image of --data (the log names the layout it found), then computes "
                                   "the features of the train and test images for each backbone, view and scale "
                                   "into the run folder. Features are cached by image content: a second extract "
                                   "computes only what is missing, and an interrupted one resumes.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--run", required=True, help="run folder (created if missing)")
    p.add_argument("--time-limit", metavar="DURATION",
                   help=TIME_LIMIT_HELP.format(what="extract scale 1, then each further scale only while its pass fits"))
    _add_options(p, [ExtractConfig, EngineConfig])

    p = sub.add_parser("train", help="train head recipes (K or 2 x K heads each) with cross-validation",
                       description="Trains the paper's seed head and the linear head (on feature blocks it "
                                   "chooses by out-of-fold log loss), blends them, and makes the one of the "
                                   "three with the lowest OOF log loss the run's recipe; or, given --head, that "
                                   "head alone. Folds and seed not given are the run's last ones, and the "
                                   "head's own options those of the run's last train if it trained that head (or of "
                                   "--heads NAME); other options add a recipe beside the earlier ones.")
    p.add_argument("--run", required=True, help="run folder that extract wrote")
    _add_options(p, [TrainConfig])
    p.add_argument("--heads", help="start from this recipe's options (retrain or finish it)")
    p.add_argument("--blend", help="comma-separated trained recipes to mix, with weights fitted on their "
                                   "out-of-fold predictions (then a temperature); train them first")

    p = sub.add_parser("submit", help="combine a recipe's test predictions into a submission CSV",
                       description="Writes the submission CSV of the recipe the last train trained (or --heads): "
                                   "one row per test image in the sample submission's order and columns, checked "
                                   "as Kaggle would check it, written atomically.")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--out", required=True, help="submission CSV to write, e.g. submissions/NAME.csv")
    p.add_argument("--heads", help=HEADS_HELP)

    p = sub.add_parser("run", help="extract, train and submit in one go",
                       description="Runs extract, train and submit on one run folder, with their options (all but "
                                   "--heads), and submits the recipe it trained. --config repeats a run from its "
                                   "config.json; options given here override it.")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--run", help="run folder (default: the one in --config)")
    p.add_argument("--out", help="submission CSV to write")
    p.add_argument("--config", help="a run's config.json: repeat that run (options given here override it)")
    p.add_argument("--time-limit", metavar="DURATION",
                   help=TIME_LIMIT_HELP.format(what="extract the first scale and train, then add each further "
                                                   "scale only while its pass and a train fit, and submit"))
    _add_options(p, [ExtractConfig, TrainConfig, EngineConfig])

    p = sub.add_parser("demo-data", help="write the small synthetic demo data set (Kaggle layout)",
                       description="Writes the synthetic demo data set (Kaggle layout: 4 classes of coloured "
                                   "shapes, 120 training and 40 test images) into a new or empty folder.")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")

    p = sub.add_parser("predict", help="score a folder or CSV of new images with a trained run",
                       description="Scores new images offline with a trained run and one of its head recipes, as "
                                   "the submission does: class probabilities per image, or the top k classes. "
                                   "Their features are cached (RUN/predict/ or --cache-dir), so an interrupted "
                                   "predict resumes and a second one reuses them.")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--images", required=True,
                   help="a folder of images (searched recursively) or a CSV with a column of image paths "
                        "(path, image, file or filepath, else the first; relative to the CSV's folder)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--format", choices=["probabilities", "top-k"], default="probabilities",
                   help="probabilities (default): image, then one column per class; top-k: image, then "
                        "label_1, prob_1, ... for the k most likely classes")
    p.add_argument("--k", type=_positive_int, default=5, help="classes per image for --format top-k (default 5)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="score every view the recipe scores and average its models, as the submission does "
                        "(default: the summary names the views); --no-tta scores the original view only")
    p.add_argument("--batch-size", type=_positive_int, help="images per forward batch (default: the run's)")
    p.add_argument("--weights", help="backbone weights (default: the run's); refused unless they are the "
                                     "ones the run was trained on")
    p.add_argument("--heads", help=HEADS_HELP)
    p.add_argument("--cache-dir", help="where to keep the images' features (default RUN/predict/); use it "
                                       "when the run folder is read-only")
    _add_options(p, [EngineConfig])

    sub.add_parser("backbones", help="list the backbones --backbones takes, with width and native size",
                   description="Lists the backbones --backbones takes: builder, pooled width, native input size, "
                               "size multiple, pooling and middle layer.")

    p = sub.add_parser("report", help="rebuild RUN/report.html: recipes, curves, metrics, calibration, errors",
                       description="Rebuilds RUN/report.html and its images from what train recorded, without "
                                   "TensorFlow: the recipes tried, loss curves, scores per fold and view, "
                                   "calibration, confused classes and the most confidently wrong images.")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--heads", help=HEADS_HELP)
    return parser


def _given(args: argparse.Namespace, cls: type) -> Overrides:
    """The options of `cls` given as flags (None where not given), under config.json's names."""
    return Overrides({name: getattr(args, meta.dest, None) for name, meta, _ in _declared([cls]) if meta.flag},
                     COMMAND_LINE)


def extract_overrides(args: argparse.Namespace) -> Overrides:
    """The extraction options given as flags (None where not given)."""
    return _given(args, ExtractConfig)


def train_overrides(args: argparse.Namespace) -> Overrides:
    """The training options (TrainConfig's and every head kind's) given as flags (None where not given)."""
    return _given(args, TrainConfig)


def extract_config(args: argparse.Namespace, saved: dict | None = None, source: str = "config.json"):
    """The extraction options: flags over `saved` (a run's config) over the defaults."""
    return merged(ExtractConfig, saved, extract_overrides(args), source)


def engine_config(args: argparse.Namespace):
    """Where the features are computed (--engine and the Ray options); not recorded in the run."""
    return EngineConfig.from_flags(dict(_given(args, EngineConfig)))


def train_config(args: argparse.Namespace, saved: dict | None = None, source: str = "config.json"):
    """The training options: flags over `saved` over the defaults."""
    return merged(TrainConfig, saved, train_overrides(args), source)


def _print_table(rows: list[list], header: list[str]) -> None:
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_extract_summary(results: Sequence[ExtractSummary]) -> None:
    """One row per split and scale (what was computed and reused, at which scale, by which
    backbones), then the images computed, each counted once whatever the number of scales."""
    from transfer_ensemble.config import scale_label

    rows = [[r.split, r.images, r.computed, r.reused, f"{r.seconds:.1f}", "-" if r.rate is None else f"{r.rate:.1f}",
             f"{scale_label(r.scale)}x", ",".join(r.backbones)] for r in results]
    _print_table(rows, ["split", "images", "computed", "reused", "seconds", "images/s", "scale", "backbones"])
    computed = {r.split: 0 for r in results}
    for r in results:
        computed[r.split] = max(computed[r.split], r.computed)
    scales = len({r.scale for r in results})
    seconds = sum(r.seconds for r in results)
    images = sum(computed.values())
    if images:
        at = f" at {scales} scales" if scales > 1 else ""
        print(f"extracted the features of {images} image{'s' if images > 1 else ''}{at} in {seconds:.1f} s")
    else:
        print("all features were already computed: reused them")


def print_metrics(metrics: dict) -> None:
    oof = metrics["oof"]
    rows = [[r["view"], r["fold"], r["n"], FitReport.from_history(r).summary, r["log_loss"], r["accuracy"]]
            for r in oof["per_fold"]]
    rows += [[view, "all (OOF)", s["n"], "", s["log_loss"], s["accuracy"]] for view, s in oof["per_view"].items()]
    e = oof["ensemble"]
    rows.append(["ensemble", "all (OOF)", e["n"], "", e["log_loss"], e["accuracy"]])
    for name, s in metrics.get("holdout", {}).items():
        rows.append([name if name in oof["per_view"] else "ensemble", "hold-out test", s["n"], "",
                     s["log_loss"], s["accuracy"]])
    _print_table(rows, ["models", "fold", "validation images", "chosen by training", "log loss", "accuracy"])
    calib = metrics.get("calibration")
    if calib:
        hold = (f"; hold-out {calib['holdout_before']['log_loss']:.4f} -> {calib['holdout_after']['log_loss']:.4f}"
                if "holdout_before" in calib else "")
        print(f"temperature {calib['temperature']:.3f} (fitted on OOF): OOF log loss "
              f"{calib['before']['log_loss']:.4f} -> {calib['after']['log_loss']:.4f}{hold}")


def print_recipes(statuses: list) -> None:
    """Every head recipe of the run, best first: what `submit` picks is the first current one."""
    from transfer_ensemble.report import RECIPE_HEADER, recipe_rows

    rows = [[r[0], r[1], *r[3:]] for r in recipe_rows(statuses)]
    _print_table(rows, [h for h in RECIPE_HEADER if h != "options"])


def print_train(result: TrainResult) -> None:
    if result.candidates:
        print(candidates_line(result.candidates))
        print()
    print(f"head recipe {result.recipe}:")
    if "parts" in result.metrics:
        print_blend_metrics(result.metrics)
    else:
        print_metrics(result.metrics)
    print()
    print_recipes(result.statuses)


def candidates_line(scores: dict[str, float]) -> str:
    """Which candidate the default `train` chose, and by how much (OOF log loss)."""
    ranked = sorted(scores, key=scores.get)
    best, others = ranked[0], ranked[1:]
    margin = (f", {100 * (1 - scores[best] / scores[others[0]]):.1f}% below {others[0]}"
              if others and scores[others[0]] > 0 else "")
    return (f"chose {best} by OOF log loss ({scores[best]:.4f}{margin}; "
            + ", ".join(f"{name} {scores[name]:.4f}" for name in others) + ")")


def summary_stream(out: str | os.PathLike):
    """Where a command's summary goes: stdout, unless the CSV `out` itself went there."""
    from transfer_ensemble.storage import stream_fd

    return sys.stderr if stream_fd(out) == 1 else sys.stdout


def print_submit(result: SubmitResult) -> None:
    file = summary_stream(result.submission)
    print(f"wrote {result.submission}: {result.rows} rows x {result.classes} classes, "
          f"the average of {result.models} models of head recipe {result.recipe}", file=file)
    if result.holdout is not None:
        h = result.holdout
        print(f"hold-out test: log loss {h['log_loss']:.4f}, accuracy {h['accuracy']:.4f} ({h['n']} images)",
              file=file)


def cmd_extract(args: argparse.Namespace) -> None:
    from transfer_ensemble import workflow
    from transfer_ensemble.runfolder import RunFolder

    kept = RunFolder(args.run).kept_views() if getattr(args, "views", None) is None else None
    config = extract_config(args, kept, str(RunFolder(args.run).config_path))
    if args.time_limit is not None:
        from transfer_ensemble import budget, plan

        limit = plan.parse_duration(args.time_limit)
        print_extract_summary(budget.run_within(limit, args.data, args.run, config, None, None,
                                                engine_config(args)).extracted)
        return
    print_extract_summary(workflow.extract(args.data, args.run, config, engine=engine_config(args)))


def cmd_train(args: argparse.Namespace) -> None:
    from transfer_ensemble import workflow

    if args.blend is not None:
        flags = {name: meta.flag for name, meta, _ in _declared([TrainConfig])}
        given = [flags[k] for k, v in train_overrides(args).items() if v is not None] \
            + (["--heads"] if args.heads else [])
        if given:
            raise UserError(f"--blend mixes recipes already trained, so it takes no training options (got "
                            f"{', '.join(given)}). Train each recipe with "
                            f"its options first, then run `train --run {args.run} --blend A,B` alone.")
        print_blend(workflow.blend(args.run, [name.strip() for name in args.blend.split(",") if name.strip()]))
        return
    print_train(workflow.train(args.run, train_overrides(args), heads=args.heads))


def print_blend(result: TrainResult) -> None:
    print(f"head recipe {result.recipe}: weights fitted on out-of-fold predictions")
    print_blend_metrics(result.metrics)
    print()
    print_recipes(result.statuses)


def print_blend_metrics(metrics: dict) -> None:
    rows = [[name, metrics["weights"][name], s["log_loss"], s["accuracy"]] for name, s in metrics["parts"].items()]
    e = metrics["oof"]["ensemble"]
    rows.append(["blend", 1.0, e["log_loss"], e["accuracy"]])
    _print_table(rows, ["recipe", "weight", "OOF log loss", "OOF accuracy"])
    calib = metrics["calibration"]
    print(f"temperature {calib['temperature']:.3f}: OOF log loss {calib['before']['log_loss']:.4f} -> "
          f"{calib['after']['log_loss']:.4f}")
    if "holdout" in metrics:
        h = metrics["holdout"]["ensemble"]
        print(f"hold-out test: log loss {h['log_loss']:.4f}, accuracy {h['accuracy']:.4f}")


def cmd_submit(args: argparse.Namespace) -> None:
    from transfer_ensemble import workflow

    print_submit(workflow.submit(args.run, args.out, heads=args.heads))


def _read_saved_config(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read the run configuration {path} ({exc}). Pass the config.json "
                        f"of an earlier run folder.") from None
    if not isinstance(saved, dict):
        raise UserError(f"The run configuration {path} holds a {type(saved).__name__}, not a JSON object. "
                        f"Pass the config.json of an earlier run folder.")
    return saved


def cmd_run(args: argparse.Namespace) -> None:
    from transfer_ensemble import workflow

    saved, source = {}, "config.json"
    if args.config:
        source = args.config
        saved = _read_saved_config(Path(args.config))
        saved.setdefault("run", str(Path(args.config).parent))
    data = args.data or saved.get("data")
    run_dir = args.run or saved.get("run")
    out = args.out or saved.get("out")
    missing = [flag for flag, v in (("--data", data), ("--run", run_dir), ("--out", out)) if not v]
    if missing:
        raise UserError(f"`run` needs {', '.join(missing)} (or --config with a run's config.json that has them).")
    extract = extract_config(args, upgrade(saved).get("extract"), source)
    engine = engine_config(args)
    candidates = saved.get("choose") if isinstance(saved.get("choose"), dict) else None
    if args.head is None and (not args.config or candidates):
        train_with = train_overrides(args)
        train = workflow.candidate_configs(train_with, candidates, source)[-1]  # checks them all before extracting
    else:
        train = train_with = train_config(args, saved.get("train"), source)
    if args.time_limit is not None:
        from transfer_ensemble import budget, plan

        done = budget.run_within(plan.parse_duration(args.time_limit), data, run_dir, extract, train_with, out,
                                 engine, folds=train.folds, candidates=candidates)
        print_extract_summary(done.extracted)
        result, submitted = done.trained, done.submitted
    else:
        print_extract_summary(workflow.extract(data, run_dir, extract, folds=train.folds, engine=engine))
        result = workflow.train(run_dir, train_with, candidates=candidates)
        submitted = workflow.submit(run_dir, out, heads=result.recipe, record_out=True)
    print_train(result)
    print()
    print_submit(submitted)


def cmd_demo_data(args: argparse.Namespace) -> None:
    from transfer_ensemble import demo

    summary = demo.write_demo_data(args.out, seed=args.seed)
    print(f"wrote the demo data set to {args.out}: {summary['train']} training and {summary['test']} "
          f"test images, {len(summary['classes'])} classes ({', '.join(summary['classes'])})")


def cmd_predict(args: argparse.Namespace) -> None:
    from transfer_ensemble import predict

    result = predict.predict_to_csv(args.run, args.images, args.out, fmt=args.format, k=args.k,
                                    tta=args.tta, batch_size=args.batch_size, weights=args.weights,
                                    heads_name=args.heads, cache_dir=args.cache_dir,
                                    engine=engine_config(args))
    print_predict(result)


def print_predict(result: PredictResult) -> None:
    what = "class probabilities" if result.format == "probabilities" else f"top {result.k} classes"
    file = summary_stream(result.out)
    print(f"wrote {result.out}: {result.images} images, {what} of {result.classes}, the average "
          f"of {result.models} models of head recipe {result.recipe} ({_scored_views(result)})", file=file)
    rate = f" ({result.computed / result.extract_seconds:.1f} images/s)" \
        if result.computed and result.extract_seconds > 0 else ""
    print(f"features: {result.computed} computed in {result.extract_seconds:.1f} s{rate}, "
          f"{result.reused} reused from {result.cache}", file=file)
    shown = ", ".join(f"{name} {n}" for name, n in list(result.predicted.items())[:10])
    more = f", and {len(result.predicted) - 10} more classes" if len(result.predicted) > 10 else ""
    print(f"most likely class: {shown}{more}", file=file)


def _scored_views(result: PredictResult) -> str:
    """The views the models scored, in words: the recipe's, or the original alone under --no-tta."""
    if not result.tta:
        return "original view only, --no-tta"
    if len(result.views) == 1:
        return f"{result.views[0]} view only: the recipe scores no other"
    return " + ".join(result.views) + " views"


def cmd_report(args: argparse.Namespace) -> None:
    from transfer_ensemble import report

    from transfer_ensemble.runfolder import RunFolder

    path = report.rebuild(args.run, args.heads)
    print(f"wrote {path} and its images in {RunFolder(args.run).report_dir}")


def cmd_backbones(args: argparse.Namespace) -> None:
    print(backbones.listing())


COMMANDS = {"backbones": cmd_backbones, "extract": cmd_extract, "train": cmd_train, "submit": cmd_submit, "run": cmd_run,
            "demo-data": cmd_demo_data, "predict": cmd_predict, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if "-q" in argv or "--quiet" in argv else logging.INFO,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        plugins.load_for_command(_prescan(argv, "--plugins"), _prescan(argv, "--run"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = build_parser().parse_args(_without_plugins(argv))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    progress.show(not args.quiet)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if getattr(args, "backbones", None) == "list":
        args.command = "backbones"
    try:
        with noise.filtered_stderr(), logging_redirect_tqdm():
            COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0

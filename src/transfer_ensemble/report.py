"""A report a person can read: ``RUN/report.html`` (self-contained) and its PNGs in ``RUN/report/``.

Built from what ``train`` leaves in the run folder (config.json, dataset.json, metrics.json, the
fold histories and the out-of-fold predictions), with matplotlib's Agg canvas and no pyplot
state. Sections: loss curves of every fold model, the out-of-fold scores, a reliability diagram
of the OOF ensemble, the most confused class pairs, per-class accuracy, and the most
confidently wrong training images.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transfer_ensemble import crossval, images
from transfer_ensemble.heads import FitReport
from transfer_ensemble.errors import UserError
from transfer_ensemble.recipes import Blend, Recipe, RecipeStatus, recipe_statuses, select_recipe
from transfer_ensemble.records import DamagedFile, load_json
from transfer_ensemble.runfolder import RunFolder
from transfer_ensemble.selection import Selection
from transfer_ensemble.storage import write_atomic

TOP_PAIRS = 20
WRONG_IMAGES = 24
WRONG_COLUMNS = 6
CALIBRATION_BINS = 10
THUMBNAIL = 200
DPI = 100
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#d62728"


@dataclass
class RunRecord:
    """Everything the report shows, read from a trained run folder and one of its head recipes."""

    run: RunFolder
    recipe: Recipe
    statuses: list[RecipeStatus]
    config: dict
    metrics: dict
    classes: list[str]
    data_root: Path
    train_paths: list[Path]
    labels: np.ndarray
    histories: dict[str, list[FitReport]]
    oof: np.ndarray
    n_test: int

    @property
    def run_dir(self) -> Path:
        return self.run.path


def load_record(run: RunFolder, heads_name: str | None = None) -> RunRecord:
    """Read the run and its recipe `heads_name` (default: the one the last `train` trained)."""
    config = run.read_config()
    run_data = run.read_run_data()
    recipe = select_recipe(run, heads_name, "report")
    if isinstance(recipe, Blend):  # the details are those of its heaviest recipe
        recipe = select_recipe(run, recipe.parts[int(np.argmax(recipe.weights))], "report")
    fix = f"Run `transfer-ensemble train --run {run.path} --heads {recipe.name}` to repair it"
    try:
        histories = {group: [FitReport.from_history(load_json(recipe.fold(group, fold).history))
                             for fold in range(recipe.config.folds)] for group in recipe.groups}
        n = len(run_data.dataset.train)
        oof = crossval.oof_probabilities(recipe, n, len(run_data.dataset.classes))
    except DamagedFile as exc:
        raise UserError(f"The run folder file {exc}. {fix}.") from None
    dataset = run_data.dataset
    return RunRecord(run, recipe, recipe_statuses(run), config, recipe.metrics(), dataset.classes,
                     dataset.root, [it.path for it in dataset.train], run_data.labels, histories, oof,
                     len(dataset.test))


def rebuild(run_dir: str | Path, heads_name: str | None = None) -> Path:
    """`transfer-ensemble report`: rebuild the report while holding the run folder's lock."""
    run = RunFolder.existing(run_dir, "report on")
    with run.lock():
        return write_report(run, heads_name)


def write_report(run: RunFolder, heads_name: str | None = None) -> Path:
    """Write RUN/report/*.png and RUN/report.html; returns the HTML path. Call it holding the lock."""
    record = load_record(run, heads_name)
    with matplotlib.rc_context({"text.parse_math": False}):  # class names are text, "$" and all
        sections = [
            _recipes_section(record),
            _loss_section(record),
            _scores_section(record),
            _calibration_section(record),
            *_confusion_sections(record),
            _wrong_images_section(record),
        ]
    for section in sections:
        for name, png in section.images:
            write_atomic(run.report_dir / name, lambda tmp, png=png: tmp.write_bytes(png), suffix=".png")
    _remove_other_images(run.report_dir, {name for section in sections for name, _ in section.images})
    page = _page(record, sections)
    write_atomic(run.report_html, lambda tmp: tmp.write_text(page, encoding="utf-8"), suffix=".html")
    return run.report_html


def _remove_other_images(folder: Path, own: set[str]) -> None:
    """A report holds only its own images: drop the PNGs an earlier report (of another recipe) left."""
    for path in folder.glob("*.png"):
        if path.name not in own:
            path.unlink(missing_ok=True)


@dataclass
class Section:
    id: str
    title: str
    body: str
    images: list[tuple[str, bytes]]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{html.escape(name)}">'


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else name[:width - 1] + "\u2026"


def _search_section(record: RunRecord, searched: str) -> Section:
    """A head's inner search (the linear head's): held-out log loss against the `searched` setting
    for every fold model."""
    figure = _figure(6.0, 3.4)
    ax = figure.subplots()
    rows = []
    for group, histories in record.histories.items():
        for fold, history in enumerate(histories):
            curve = history.search
            if curve:
                cs = [float(c) for c in curve]
                ax.plot(cs, list(curve.values()), marker="o", markersize=3, label=f"{group}, fold {fold}")
            rows.append([f"{group}, fold {fold}", history.chosen.get(searched), history.iterations,
                         min(curve.values()) if curve else history.note])
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda c, _: f"{c:g}"))  # not mathtext: parse_math is off
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(searched, fontsize=8)
    ax.set_ylabel("held-out log loss", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.lines:  # no curves when every fold skipped the inner search (a class of one image)
        ax.legend(fontsize=7)
    png = _png(figure)
    body = ("<p>Each fold model's regularisation was chosen on a held-out share of its own training "
            "images (never its validation fold): the setting with the lowest held-out log loss, then refitted "
            "on all its training rows.</p>\n" + _img("inner_search.png", png, "inner search")
            + _table(["model", f"chosen {searched}", "iterations", "held-out log loss"], rows))
    return Section("loss", "Regularisation search", body, [("inner_search.png", png)])


def _fits_section(record: RunRecord) -> Section:
    """What each fold model's training chose, for a kind of head with no curves to plot."""
    rows = [[f"{group}, fold {fold}", report.summary] for group, reports in record.histories.items()
            for fold, report in enumerate(reports)]
    return Section("loss", "Fold models", "<p>What training chose for each fold model.</p>\n"
                   + _table(["model", "chosen by training"], rows, 2), [])


def _loss_section(record: RunRecord) -> Section:
    first = next(iter(record.histories.values()))
    if not first[0].curves.get("loss"):
        return _search_section(record, first[0].searched) if first[0].searched else _fits_section(record)
    groups = list(record.histories)
    folds = len(first)
    columns = min(folds, 5)
    blocks = -(-folds // columns)
    rows = blocks * len(groups)
    figure = _figure(10.5 if columns >= 3 else 3.6 * columns + 0.6, 2.4 * rows + 0.5)
    axes = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for v, view in enumerate(groups):
        for fold, history in enumerate(record.histories[view]):
            ax = axes[v * blocks + fold // columns][fold % columns]
            epochs = np.arange(1, len(history.curves["loss"]) + 1)
            ax.plot(epochs, history.curves["loss"], color=TRAIN_COLOR, label="training loss")
            ax.plot(epochs, history.curves["val_loss"], color=VAL_COLOR, label="validation loss")
            best = int(history.best_epoch)
            ax.axvline(best, color="0.4", linestyle="--", linewidth=1, label="early-stopping epoch")
            ax.plot([best], [history.curves["val_loss"][best - 1]], "o", color=VAL_COLOR)
            ax.set_title(f"{view}, fold {fold}: best epoch {best}", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
            if len(epochs) <= 12:
                ax.set_xticks(epochs)
        for fold in range(folds, blocks * columns):
            axes[v * blocks + fold // columns][fold % columns].set_visible(False)
    for row in axes:
        row[0].set_ylabel("log loss", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=3, fontsize=9, frameon=False)
    png = _png(figure)
    body = (f"<p>Training loss (with dropout active) and validation-fold loss per epoch for each of the "
            f"{len(groups) * folds} fold models. The dashed line marks the epoch whose weights early "
            f"stopping kept (lowest validation loss).</p>\n" + _img("loss_curves.png", png, "loss curves"))
    return Section("loss", "Training and validation loss", body, [("loss_curves.png", png)])


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
            cells.append(f'<td class="num">{text}</td>' if i >= numeric_from else f"<td>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(lines) + "\n</tbody></table>"


def recipe_rows(statuses: list[RecipeStatus]) -> list[list]:
    """One row per head recipe, best first: name, state, options, OOF (and hold-out) scores."""
    rows = []
    for status in statuses:
        options = _options_text(status)
        oof = status.metrics["oof"]["ensemble"] if status.metrics else None
        hold = (status.metrics or {}).get("holdout", {}).get("ensemble")
        rows.append([status.recipe.name, status.state, options, blocks_text(status.recipe),
                     oof["log_loss"] if oof else "", oof["accuracy"] if oof else "",
                     hold["log_loss"] if hold else "", hold["accuracy"] if hold else ""])
    return rows


def blocks_text(recipe: "Recipe | Blend | object") -> str:
    """The feature blocks a recipe trains on; for blocks chosen by OOF, of how many and the honest
    (nested) OOF log loss of that choice; nothing for a blend."""
    if not isinstance(recipe, Recipe):
        return ""
    text = " + ".join(recipe.blocks.sources)
    if "selection" in recipe.inputs:
        chosen = Selection.from_json(recipe.inputs["selection"])
        text += (f" (chosen of {len(chosen.candidates)} by OOF; the choosing flatters its OOF log loss by "
                 f"{chosen.flattery:+.4f}, nested check)")
    return text


def _options_text(status: RecipeStatus) -> str:
    """A recipe's options and what training chose (regularisation, temperature); a blend's weights."""
    recipe, metrics = status.recipe, status.metrics or {}
    if isinstance(recipe, Blend):
        text = "blend of " + ", ".join(f"{name} x {w:.2f}" for name, w in zip(recipe.parts, recipe.weights))
    else:
        text = ", ".join(f"{k} {v}" for k, v in recipe.config.to_json().items())
        rows = [FitReport.from_history(r) for r in (metrics.get("oof") or {}).get("per_fold", [])]
        for key in dict.fromkeys(k for r in rows for k in r.chosen):
            text += f"; chosen {key} {', '.join(sorted({str(r.chosen[key]) for r in rows if key in r.chosen}))}"
    if "calibration" in metrics:
        text += f"; temperature {metrics['calibration']['temperature']:.3f}"
    return text


RECIPE_HEADER = ["recipe", "state", "options", "feature blocks", "OOF log loss", "OOF accuracy",
                 "hold-out log loss", "hold-out accuracy"]


def _recipes_section(record: RunRecord) -> Section:
    table = _table(RECIPE_HEADER, recipe_rows(record.statuses), 4)
    body = (f"<p>Every head recipe trained on this run, best out-of-fold (OOF) log loss first. "
            f"<code>submit</code>, <code>predict</code> and this report use the one the last "
            f"<code>train</code> trained unless given <code>--heads NAME</code> (or <code>--heads "
            f"best</code>: the current one with the lowest OOF log loss); this report shows <b>{html.escape(record.recipe.name)}</b>. "
            f"A stale recipe was trained on features or labels the run no longer has. Hold-out scores "
            f"(labelled test images) are shown for information only: nothing is chosen by them.</p>\n"
            + table)
    return Section("recipes", "Head recipes tried on this run", body, [])


def _scores_section(record: RunRecord) -> Section:
    oof = record.metrics["oof"]
    rows = [[f"{r['view']}, fold {r['fold']}", r["n"], _chosen(r), r["log_loss"], r["accuracy"]]
            for r in oof["per_fold"]]
    rows += [[f"{view}, all folds (OOF)", s["n"], "", s["log_loss"], s["accuracy"]]
             for view, s in oof["per_view"].items()]
    e = oof["ensemble"]
    rows.append(["ensemble (OOF)", e["n"], "", e["log_loss"], e["accuracy"]])
    table = _table(["model", "images", "chosen by training", "log loss", "accuracy"], rows)
    body = ("<p>Each fold model scored on its own validation fold; then each model group's out-of-fold "
            "(OOF) predictions over all training images, and their ensemble, which is how the "
            "submission combines them. Lower log loss is better.</p>\n" + table)
    holdout = record.metrics.get("holdout")
    if holdout:
        hold_rows = [[f"{name if name in oof['per_view'] else 'ensemble'} (test)", s["n"],
                      s["log_loss"], s["accuracy"]] for name, s in holdout.items()]
        body += ("\n<p>The test images are labelled (a hold-out set): the same scores on them.</p>\n"
                 + _table(["model", "images", "log loss", "accuracy"], hold_rows))
    calib = record.metrics.get("calibration")
    if calib:
        cal_rows = [["OOF", calib["before"]["log_loss"], calib["after"]["log_loss"]]]
        if "holdout_before" in calib:
            cal_rows.append(["hold-out test", calib["holdout_before"]["log_loss"], calib["holdout_after"]["log_loss"]])
        body += (f"\n<p>Temperature calibration: T = {calib['temperature']:.3f}, fitted on the OOF "
                 f"predictions only (T &gt; 1 softens over-confident probabilities). Log loss before "
                 f"and after:</p>\n" + _table(["predictions", "before", "after"], cal_rows))
    return Section("scores", "Out-of-fold scores", body, [])


def _chosen(row: dict) -> str:
    """A metrics.json per-fold row's summary of what training chose (old rows: from their keys)."""
    return FitReport.from_history(row).summary


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Per confidence bin: mean confidence, accuracy and count; and the expected calibration error."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    safe = np.maximum(count, 1)
    mean_conf = np.bincount(index, weights=confidence, minlength=bins) / safe
    accuracy = np.bincount(index, weights=correct.astype(float), minlength=bins) / safe
    ece = float(np.sum(count / max(len(labels), 1) * np.abs(accuracy - mean_conf)))
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy, "ece": ece}


def _calibration_section(record: RunRecord) -> Section:
    cal = calibration(record.oof, record.labels)
    figure = _figure(7.5, 6.2)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    used = cal["count"] > 0
    centers = (cal["edges"][:-1] + cal["edges"][1:]) / 2
    width = cal["edges"][1] - cal["edges"][0]
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="perfect calibration")
    top.bar(centers[used], cal["accuracy"][used], width=width * 0.9, color=TRAIN_COLOR, alpha=0.75,
            edgecolor="white", label="accuracy in the bin")
    top.plot(cal["confidence"][used], cal["accuracy"][used], "o-", color=VAL_COLOR,
             label="mean confidence vs accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"OOF ensemble, {len(record.labels)} training images: expected calibration error "
                  f"{cal['ece']:.3f}", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centers, cal["count"], width=width * 0.9, color="0.55", edgecolor="white")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
    png = _png(figure)
    body = (f"<p>The out-of-fold ensemble's predictions grouped by confidence in {CALIBRATION_BINS} bins. "
            f"Bars on the diagonal mean the probabilities can be taken at face value; bars below it, "
            f"over-confidence; above it, under-confidence. Expected calibration error: "
            f"<b>{cal['ece']:.3f}</b>. Below: how many images fall in each bin.</p>\n"
            + _img("calibration.png", png, "reliability diagram"))
    return Section("calibration", "Calibration (reliability diagram)", body, [("calibration.png", png)])


def confusion(probabilities: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, probabilities.argmax(axis=1)), 1)
    return matrix


def confused_pairs(matrix: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int, int]]:
    """(true class, predicted class, count) of the most frequent errors, most first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.nonzero(off))]
    pairs.sort(key=lambda x: (-x[2], x[0], x[1]))
    return pairs[:top]


def _confusion_sections(record: RunRecord) -> list[Section]:
    matrix = confusion(record.oof, record.labels, len(record.classes))
    per_class = matrix.sum(axis=1)
    pairs = confused_pairs(matrix)
    names = record.classes
    if pairs:
        figure = _figure(9, max(2.6, 0.32 * len(pairs) + 1.2))
        ax = figure.subplots()
        y = np.arange(len(pairs))
        ax.barh(y, [n for _, _, n in pairs], color=VAL_COLOR, alpha=0.8)
        ax.set_yticks(y, [f"{_short(names[t])} \u2192 {_short(names[p])}" for t, p, _ in pairs], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("training images (out-of-fold)")
        ax.set_title(f"The {len(pairs)} most frequent errors: true class \u2192 predicted class", fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(axis="x", alpha=0.3)
        png = _png(figure)
        rows = [[names[t], names[p], n, f"{100 * n / per_class[t]:.1f}%"] for t, p, n in pairs]
        body = (f"<p>Where the out-of-fold ensemble goes wrong most often (of {int(matrix.sum())} training "
                f"images, {int(matrix.sum() - np.trace(matrix))} are misclassified).</p>\n"
                + _img("confused_pairs.png", png, "most confused class pairs")
                + _table(["true class", "predicted as", "images", "share of the true class"], rows, 2))
        pair_section = Section("confused", f"The {len(pairs)} most confused class pairs", body,
                               [("confused_pairs.png", png)])
    else:
        pair_section = Section("confused", "Most confused class pairs",
                               "<p>The out-of-fold ensemble classifies every training image correctly: "
                               "no class is confused with another.</p>", [])

    accuracy = np.diag(matrix) / np.maximum(per_class, 1)
    order = np.argsort(accuracy, kind="stable")
    figure = _figure(9, max(2.6, 0.22 * len(order) + 1.2))
    ax = figure.subplots()
    y = np.arange(len(order))
    ax.barh(y, accuracy[order], color=TRAIN_COLOR, alpha=0.8)
    ax.set_yticks(y, [f"{_short(names[c])} ({per_class[c]})" for c in order],
                  fontsize=8 if len(order) <= 60 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(float(np.trace(matrix) / max(matrix.sum(), 1)), color="0.3", linestyle="--", linewidth=1,
               label="overall accuracy")
    ax.set_xlabel("accuracy (out-of-fold)")
    ax.set_title("Per-class accuracy, worst first (training images per class in brackets)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    png = _png(figure)
    worst = ", ".join(f"{html.escape(names[c])} ({accuracy[c]:.0%})" for c in order[:5])
    body = (f"<p>The share of each class's training images that the out-of-fold ensemble gets right. "
            f"Worst: {worst}.</p>\n" + _img("per_class_accuracy.png", png, "per-class accuracy"))
    class_section = Section("per-class", "Per-class accuracy, worst first", body,
                            [("per_class_accuracy.png", png)])
    return [pair_section, class_section]


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        image = images.decode(path)
    except images.ImageReadError:
        return None
    h, w = image.shape[:2]
    scale = THUMBNAIL / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _caption(text: str, width: int = 24) -> str:
    """At most two lines of `width` characters, so captions of neighbouring images do not overlap."""
    lines = textwrap.wrap(text.replace("_", " "), width, break_long_words=True)
    if len(lines) > 2:
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), width, placeholder="\u2026")]
    return "\n".join(lines)


def _wrong_images_section(record: RunRecord) -> Section:
    predicted = record.oof.argmax(axis=1)
    confidence = record.oof[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != record.labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:WRONG_IMAGES]
    if not len(wrong):
        return Section("wrong", "Most confidently wrong training images",
                       "<p>No training image is misclassified out of fold.</p>", [])
    columns = min(WRONG_COLUMNS, len(wrong))
    rows = -(-len(wrong) // columns)
    figure = _figure(1.85 * columns, 2.7 * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    names = record.classes
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, wrong):
        thumb = _thumbnail(record.train_paths[i])
        if thumb is None:
            ax.text(0.5, 0.5, "image not readable", ha="center", va="center", fontsize=8, color="0.4")
        else:
            ax.imshow(thumb)
        title = _caption(f"true: {names[record.labels[i]]}") + "\n" + \
            _caption(f"pred: {names[predicted[i]]} ({confidence[i]:.2f})")
        ax.set_title(title, fontsize=8, color="#8b0000", loc="left")
    png = _png(figure)
    rows_html = [[record.train_paths[i].relative_to(record.data_root)
                  if record.train_paths[i].is_relative_to(record.data_root) else record.train_paths[i],
                  names[record.labels[i]], names[predicted[i]], float(confidence[i]),
                  float(record.oof[i, record.labels[i]])] for i in wrong]
    body = (f"<p>The {len(wrong)} training images the out-of-fold ensemble gets wrong with the highest "
            f"confidence, true and predicted class (with its probability). Often a mislabelled image, "
            f"or two classes that are hard to tell apart.</p>\n"
            + _img("confidently_wrong.png", png, "most confidently wrong training images")
            + _table(["image", "true class", "predicted", "p(predicted)", "p(true)"],
                     [[str(r[0]), *r[1:]] for r in rows_html], 3))
    return Section("wrong", "Most confidently wrong training images", body, [("confidently_wrong.png", png)])


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.6em 1em; }
nav a { margin-right: 1em; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dt { color: #666; } dd { margin: 0; }
"""


def _summary(record: RunRecord) -> str:
    extract = record.config.get("extract", {})
    train = record.recipe.config.to_json()
    versions = record.config.get("versions", {})
    size = extract.get("image_size") or "native"
    e = record.metrics["oof"]["ensemble"]
    items = [
        ("run folder", str(record.run_dir)),
        ("data", f"{record.data_root} ({len(record.labels)} training images, {record.n_test} test images, "
                 f"{len(record.classes)} classes)"),
        ("backbones", f"{', '.join(extract.get('backbones', []))} at {size} px, "
                      f"{extract.get('precision', 'float32')}, weights {extract.get('weights')}"),
        ("heads", f"recipe {record.recipe.name}: " + ", ".join(f"{k} {v}" for k, v in train.items())
                  + f" ({len(record.recipe.jobs)} fold models, temperature {record.recipe.temperature:.3f})"),
        ("features", f"{', '.join(record.recipe.blocks.sources)} side by side, in the views "
                     f"{', '.join(record.recipe.blocks.views)}"),
        ("OOF ensemble", f"log loss {e['log_loss']:.4f}, accuracy {e['accuracy']:.4f}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
    ]
    used = record.config.get("plugins") or {}
    if used:
        items.append(("plug-ins", "; ".join(f"{kind} {name} (from {module})" for kind, names in used.items()
                                            for name, module in names.items())))
    rows = "\n".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
    warn = ""
    if extract.get("weights") == "random":
        warn = ('<p class="warn">This run used <b>--weights random</b>: the backbones are untrained, so '
                'its features and scores mean nothing. Use it only as a smoke test.</p>\n')
    for warning in record.metrics.get("warnings", []):
        warn += f'<p class="warn">{html.escape(warning)}</p>\n'

    return warn + f"<dl>\n{rows}\n</dl>"


def _page(record: RunRecord, sections: list[Section]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = [f'<section id="{s.id}">\n<h2>{html.escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections]
    title = f"transfer-ensemble report: {record.run_dir.name}"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class=\"sub\">Written {stamp}.</p>\n"
            f"{_summary(record)}\n<nav>{nav}</nav>\n" + "\n".join(parts) + "\n</body>\n</html>\n")

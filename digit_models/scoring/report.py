"""A training run, and optionally its scored test set, as pictures and one HTML page.

The page embeds its images as data URIs, so index.html alone can be mailed around; the PNGs are
written beside it for slides and chats. Everything is computed before anything is written, and
written into a staging folder renamed to `out` at the end: an output folder is complete or absent.
On object storage, which cannot rename, the files are written into `out` itself, index.html last.

The figures are bare matplotlib `Figure`s, never pyplot's: no GUI backend is chosen and no
global figure state kept, so this runs headless and leaves a calling notebook's backend alone.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass

import numpy as np
from typing import TYPE_CHECKING

from digit_models.errors import DigitsError
from digit_models.scoring.evaluation import evaluate
from digit_models.storage.files import Folder, require_output_folder, shown_name, without_credentials, writing_into
from digit_models.storage.kaggle_csv import NUM_CLASSES
from digit_models.scoring.predict import RECORD_FILE, read_back
from digit_models.scoring.predict_input import inspect_file, open_input, read_images
from digit_models.storage.run_dir import RunDir
from digit_models.storage.submission_csv import read_id_label_csv

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_report"]  # the rest is its parts, named for reading and testing

PAGE = "index.html"
GALLERY_SIZE = 24
GALLERY_COLUMNS = 6


def write_report(run_dir: str, out: str, predictions: str | None = None, labels: str | None = None) -> list[str]:
    """Writes training_curves.png; with predictions (a `digits predict` folder) and their true
    labels (`ImageId,Label`) also confusion_matrix.png, per_class_accuracy.png and
    mistakes.png; then index.html. `out` must be new or empty. Returns the names written."""
    if (predictions is None) != (labels is None):
        raise DigitsError("a report on predictions needs both the predictions and their labels")
    run = read_run(run_dir)
    target = Folder(out)
    require_output_folder(target, "choose another output folder")
    figures = {"training_curves.png": training_curves(run)}
    evaluation = scoring = None
    if predictions is not None:
        evaluation = evaluate(predictions, labels)  # also checks both name the same images
        figures["confusion_matrix.png"] = confusion_matrix(evaluation)
        figures["per_class_accuracy.png"] = per_class_accuracy(evaluation)
        figures["mistakes.png"] = mistakes_gallery(confident_mistakes(predictions, labels))
        scoring = Folder(predictions).read_json(RECORD_FILE)  # a predict folder: confident_mistakes checked
    pngs = {name: _png(figure) for name, figure in figures.items()}
    with writing_into(target) as folder:
        for name, content in pngs.items():
            folder.write_bytes(name, content)
        folder.write_text(PAGE, _page(run, run_dir, evaluation, scoring, pngs))  # last: the report is whole
    return [*pngs, PAGE]


def read_run(run_dir: str) -> dict:
    run_folder = RunDir(run_dir)
    run = run_folder.read_run()
    history = run.get("history")
    if not history or not all(
        isinstance(entry, dict) and {"epoch", "loss", "accuracy"} <= entry.keys() for entry in history
    ):
        raise DigitsError(f"{run_folder.child(RunDir.RUN)}: no per-epoch history of loss and accuracy")
    return run


# ---------------------------------------------------------------------------- figures
# matplotlib is imported where it draws: at the top it would delay every bad-input error by
# about a second.


def _figure(**options) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**options)


def training_curves(run: dict) -> Figure:
    """Loss, and the error rate (1 - accuracy) on a log scale: past 99% accuracy, the epochs
    that still halve the errors would look flat on an accuracy axis."""
    from matplotlib.ticker import MaxNLocator

    history = run["history"]
    epochs = [entry["epoch"] for entry in history]
    figure = _figure(figsize=(10, 4), layout="constrained")
    loss_axes, error_axes = figure.subplots(1, 2)
    curves = (
        ("loss", loss_axes, lambda values: values),
        ("accuracy", error_axes, lambda values: np.where(values < 1, 1 - values, np.nan)),
    )
    for metric, axes, shown in curves:
        for prefix, label in (("", "training"), ("val_", "validation")):
            if any(prefix + metric in entry for entry in history):
                values = np.array([entry.get(prefix + metric, np.nan) for entry in history], float)
                axes.plot(epochs, shown(values), "o-", label=label)
        axes.set(xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3, which="both")
        axes.legend()
    loss_axes.set_title("loss")
    error_axes.set(title="error rate (1 - accuracy), log scale", yscale="log")
    # Both: a range within one decade has no major tick, and its minor ticks carry the labels.
    error_axes.yaxis.set_major_formatter(_log_percent_formatter())
    error_axes.yaxis.set_minor_formatter(_log_percent_formatter(labelOnlyBase=False))
    figure.suptitle(_run_title(run))
    return figure


def _log_percent_formatter(**options):
    """A log axis's labels as percentages ("4%", "0.5%"): which ticks get one is matplotlib's
    choice for a log axis (its LogFormatter), the text ours, where its own would mix 4x10^-2
    on the minor ticks with percentages on the major ones."""
    from matplotlib.ticker import LogFormatter

    class LogPercentFormatter(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{100 * x:.3g}%"

    return LogPercentFormatter(**options)


def _run_title(run: dict) -> str:
    workers = run.get("workers", 1)
    preset = (run.get("config") or {}).get("preset")
    return " · ".join(
        [
            str(run.get("model", "model")),
            f"{workers} worker{'s' * (workers != 1)}",
            *([f"preset {preset}"] if preset else []),
        ]
    )


def confusion_matrix(evaluation: dict) -> Figure:
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    counts = np.array(evaluation["confusion_matrix"])
    figure = _figure(figsize=(6.5, 5.5), layout="constrained")
    axes = figure.subplots()
    # Log colours: the diagonal holds thousands and the errors a handful; on a linear scale
    # every error would be the same pale colour. Zero cells are left white, and the palest
    # blues cut off so that a single error still stands out from them.
    norm = LogNorm(vmin=1, vmax=max(counts.max(), 10))
    palette = ListedColormap(colormaps["Blues"](np.linspace(0.15, 1.0, 256)))
    image = axes.imshow(np.ma.masked_equal(counts, 0), cmap=palette, norm=norm)
    for (true, predicted), count in np.ndenumerate(counts):
        if count:
            axes.text(
                predicted,
                true,
                f"{count:,}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm(count) > 0.6 else "black",
            )
    axes.set(
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        xlabel="predicted label",
        ylabel="true label",
        title=f"confusion matrix · {evaluation['images']:,} images",
    )
    figure.colorbar(image, ax=axes, label="images (log scale)")
    return figure


def per_class_accuracy(evaluation: dict) -> Figure:
    from matplotlib.ticker import PercentFormatter

    per_class = [evaluation["per_class"][str(digit)] for digit in range(NUM_CLASSES)]
    accuracy = np.array([entry["accuracy"] for entry in per_class])
    figure = _figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    bars = axes.bar(range(NUM_CLASSES), accuracy, color="tab:blue")
    axes.bar_label(bars, labels=[f"{value:.2%}" for value in accuracy], padding=-14, fontsize=8, color="white")
    # Behind the bars, so that it never crosses the numbers on them.
    axes.axhline(evaluation["accuracy"], color="tab:orange", linestyle="--", zorder=0)
    # Zoomed in: from zero, bars at 98% and 100% would look the same.
    lowest = accuracy.min()
    axes.set_ylim(max(0.0, lowest - max(0.6 * (1 - lowest), 0.005)), 1.0)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    axes.set_xticks(range(NUM_CLASSES), [f"{digit}\n({entry['images']:,})" for digit, entry in enumerate(per_class)])
    axes.set(xlabel="true label (images)", title=f"accuracy per class · overall {evaluation['accuracy']:.2%} (dashed)")
    return figure


@dataclass
class Mistakes:
    """The wrong predictions the model was surest of, surest first."""

    total: int  # all wrong predictions, of which these are the first
    image_ids: np.ndarray
    truth: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    images: np.ndarray  # (n, 28, 28) uint8, as scored


def confident_mistakes(predictions: str, labels: str, limit: int = GALLERY_SIZE) -> Mistakes:
    folder = Folder(predictions)
    if not folder.is_folder():
        raise DigitsError(
            f"{predictions}: not a `digits predict` output folder (a submission.csv has neither confidences nor images)"
        )
    table = read_back(folder, ["ImageId", "Label", "Confidence"]).sort_by("ImageId")
    ids = table.column("ImageId").to_numpy().astype(np.int64)
    predicted = table.column("Label").to_numpy()
    confidence = table.column("Confidence").to_numpy()
    true_ids, truth = read_id_label_csv(labels)
    truth = truth[np.argsort(true_ids)]  # evaluate() has checked the ImageIds are the same
    wrong = np.flatnonzero(predicted != truth)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    images = _scored_images(folder, ids[shown]) if len(shown) else np.zeros((0, 28, 28), np.uint8)
    return Mistakes(
        total=len(wrong),
        image_ids=ids[shown],
        truth=truth[shown],
        predicted=predicted[shown],
        confidence=confidence[shown],
        images=images,
    )


def _scored_images(folder: Folder, wanted: np.ndarray) -> np.ndarray:
    """The images with these ImageIds, from the input that was scored."""
    record = folder.read_json(RECORD_FILE)
    try:
        source = open_input(record["input"])
        # Images are matched to predictions by ImageId alone, so they must be the ones scored.
        scored = {entry["file"]: entry["sha256"] for entry in record["input_files"]}
        for file in source.files:
            if scored.get(file) != inspect_file(source.kind, file)["sha256"]:
                raise DigitsError(f"{file}: changed since it was scored")
        found = read_images(source, wanted)
    except DigitsError as exc:  # a relative input is relative to where `digits predict` ran
        raise DigitsError(f"{folder.child(RECORD_FILE)}: the scored images: {exc}") from None
    return np.stack([found[int(image_id)] for image_id in wanted])


def mistakes_gallery(mistakes: Mistakes) -> Figure:
    if not mistakes.total:
        figure = _figure(figsize=(6, 1.2))
        figure.text(0.5, 0.5, "no mistakes: every image was predicted correctly", ha="center", va="center", fontsize=13)
        return figure
    rows = -(-len(mistakes.images) // GALLERY_COLUMNS)
    figure = _figure(figsize=(1.6 * GALLERY_COLUMNS, 1.9 * rows + 0.5), layout="constrained")
    panels = list(figure.subplots(rows, GALLERY_COLUMNS, squeeze=False).flat)
    for axes in panels:
        axes.set_axis_off()  # frames and ticks would only clutter the digits; blanks stay blank
    for axes, image_id, truth, predicted, confidence, image in zip(
        panels, mistakes.image_ids, mistakes.truth, mistakes.predicted, mistakes.confidence, mistakes.images
    ):
        axes.imshow(image, cmap="gray", vmin=0, vmax=255)
        axes.set_title(f"true {truth} / pred {predicted} ({_probability(confidence)})\nImageId {image_id}", fontsize=8)
    shown = len(mistakes.images)
    figure.suptitle(
        f"{mistakes.total:,} mistake{'s' * (mistakes.total != 1)}"
        + (f", the {shown} most confident shown" if shown < mistakes.total else "")
    )
    return figure


def _probability(p: float) -> str:
    """A probability with the decimals that show two digits of its distance from 1 (up to 6):
    0.62, 0.9987, 0.999990; the surest mistakes are all near 1, where two decimals make every
    one of them "1.00"."""
    decimals = min(6, max(2, 1 - math.floor(math.log10(max(1 - p, 1e-6)))))
    return f"{p:.{decimals}f}"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the page


def _page(run: dict, run_dir: str, evaluation: dict | None, scoring: dict | None, pngs: dict[str, bytes]) -> str:
    last = run["history"][-1]
    config = run.get("config") or {}
    summary = [
        ("run", run_dir),
        ("model", run.get("model")),
        ("workers", run.get("workers")),
        ("preset", config.get("preset")),
        *_settings(run, config),
        ("epochs run", f"{run.get('epochs_run', len(run['history']))} of {run.get('epochs_planned', '?')}"),
        ("stop reason", run.get("stop_reason")),
        ("wall time", f"{run['wall_s']:,.1f} s" if "wall_s" in run else None),
        *(
            (f"final {key}", f"{last[key]:.4f}")
            for key in ("loss", "accuracy", "val_loss", "val_accuracy")
            if key in last
        ),
    ]
    sections = [f"<h2>Training</h2>\n{_table(summary)}"]
    if evaluation:
        scored = [
            ("predictions", evaluation["predictions"]),
            *_scored_with(scoring or {}),
            ("labels", evaluation["labels"]),
            ("accuracy", _accuracy(evaluation)),
        ]
        if "official_mnist_test" in evaluation:
            scored.append(("official MNIST test images", _accuracy(evaluation["official_mnist_test"])))
        sections.append(f"<h2>Evaluation</h2>\n{_table(scored)}")
    sections += [
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(content).decode()}"><figcaption>{name}</figcaption></figure>'
        for name, content in pngs.items()
    ]
    name = shown_name(run_dir)
    title = html.escape(f"Report: {run.get('model', 'model')} run {name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "td,th{padding:2px 12px;text-align:left}img{max-width:100%}</style></head>\n"
        f"<body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _settings(run: dict, config: dict) -> list[tuple[str, object]]:
    """What the run was trained with (run.json's config), beside the preset it started from."""
    if not config:
        return []
    per_update = run.get("global_batch_size")
    rate = run.get("learning_rate_per_update")
    return [
        ("batch", f"{config.get('batch_size')} per worker" + (f", {per_update} per update" if per_update else "")),
        (
            "learning rate",
            f"{config.get('learning_rate'):g}"
            + (f" ({rate:.3g} per update)" if rate and rate != config.get("learning_rate") else "")
            + f", {config.get('lr_schedule', 'constant')} schedule",
        ),
        ("seed", config.get("seed")),
    ]


def _scored_with(record: dict) -> list[tuple[str, object]]:
    """The models the predictions average (an ensemble's members) and their test-time views,
    from predict.json."""
    runs = record.get("runs") or []
    # predict.json before tta_extra_views recorded only the views in all, as tta_views.
    extra = record.get("tta_extra_views", record.get("tta_views", 1) - 1)
    return [
        (f"ensemble of {len(runs)}" if len(runs) > 1 else "model", ", ".join(runs) or None),
        (
            "test-time augmentation",
            f"{extra} extra view{'s' * (extra != 1)} per image ({extra + 1} averaged)" if extra else "none",
        ),
    ]


def _accuracy(scores: dict) -> str:
    return f"{scores['accuracy']:.2%} ({scores['correct']:,} / {scores['images']:,})"


def _table(rows: list[tuple[str, object]]) -> str:
    return (
        "<table>\n"
        + "\n".join(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(without_credentials(str(value)))}</td></tr>"
            for name, value in rows
            if value is not None
        )
        + "\n</table>"
    )

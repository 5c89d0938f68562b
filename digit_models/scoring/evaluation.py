"""`digits evaluate`: accuracy, per-class accuracy and the confusion matrix of a scoring run
(or any Kaggle submission.csv) against the true labels.

Predictions and labels are matched by ImageId, and every mismatch between the two sets is an
error: a missing, duplicated or unknown ImageId would otherwise give a silently wrong score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digit_models.errors import DigitsError
from digit_models.storage.files import Folder, is_uri, parent_and_name
from digit_models.storage.kaggle_csv import NUM_CLASSES
from digit_models.scoring.predict import PREDICTIONS_DIR, read_back
from digit_models.storage.submission_csv import read_id_label_csv, read_small_csv


def evaluate(predictions: str, labels: str, origin: str | None = None) -> dict:
    """Scores predictions (a `digits predict` folder or a submission.csv) against labels
    (`ImageId,Label`). With `origin` (test_origin.csv from `digits data`, found beside the
    labels by default) the official MNIST test images are also reported on their own."""
    predicted_ids, predicted = read_predictions(predictions)
    true_ids, truth = read_id_label_csv(labels)
    _require_same_images(predicted_ids, true_ids, predictions, labels)
    predicted = predicted[np.argsort(predicted_ids)]
    truth = truth[np.argsort(true_ids)]
    result = {"predictions": str(predictions), "labels": str(labels), **scores(truth, predicted)}

    origin = origin or _origin_beside(labels)
    if origin:
        origin_ids, official = read_origin(origin)
        if not np.array_equal(origin_ids, np.sort(true_ids)):
            raise DigitsError(f"{origin}: its ImageIds are not those of {labels}")
        result["origin"] = str(origin)
        result["official_mnist_test"] = scores(truth[official], predicted[official])
    return result


def read_origin(origin: str) -> tuple[np.ndarray, np.ndarray]:
    """test_origin.csv's ImageIds in ascending order, and which of them are official MNIST
    test images."""
    columns = read_small_csv(origin, ["ImageId", "MnistSplit", "MnistIndex"])
    ids = np.array(columns["ImageId"], dtype=np.int64)
    order = np.argsort(ids)
    return ids[order], np.array(columns["MnistSplit"])[order] == "test"


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {
        str(digit): {
            "accuracy": _ratio(confusion[digit, digit], confusion[digit].sum()),
            "images": int(confusion[digit].sum()),
        }
        for digit in range(NUM_CLASSES)
    }
    correct = int(np.trace(confusion))
    return {
        "accuracy": _ratio(correct, len(truth)),
        "correct": correct,
        "images": int(len(truth)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def read_predictions(location: str) -> tuple[np.ndarray, np.ndarray]:
    folder = Folder(location)
    if folder.is_folder():
        table = read_back(folder, ["ImageId", "Label"])
        where = folder.child(PREDICTIONS_DIR)
        ids = table.column("ImageId").to_numpy().astype(np.int64)
        labels = table.column("Label").to_numpy().astype(np.int64)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DigitsError(f"{where}: ImageId {unique[counts > 1][0]} appears more than once")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise DigitsError(f"{where}: Label outside 0-9")
        return ids, labels
    return read_id_label_csv(location)


def _require_same_images(predicted_ids, true_ids, predictions: str, labels: str) -> None:
    missing = np.setdiff1d(true_ids, predicted_ids)
    unknown = np.setdiff1d(predicted_ids, true_ids)
    if len(unknown):
        raise DigitsError(
            f"{predictions}: ImageId {unknown[0]} is not in {labels} "
            f"({len(unknown)} such; labels of a different test set?)"
        )
    if len(missing):
        raise DigitsError(f"{predictions}: no prediction for ImageId {missing[0]} of {labels} ({len(missing)} missing)")


def _origin_beside(labels: str) -> str | None:
    candidate = Path(labels).with_name("test_origin.csv")
    return str(candidate) if not is_uri(labels) and candidate.is_file() else None


def _ratio(part, whole) -> float:
    return round(float(part) / float(whole), 6) if whole else 0.0


def format_report(result: dict) -> str:
    lines = [f"accuracy {result['accuracy']:.4f} ({result['correct']:,} / {result['images']:,})"]
    if "official_mnist_test" in result:
        official = result["official_mnist_test"]
        lines.append(
            f"official MNIST test images: accuracy {official['accuracy']:.4f} "
            f"({official['correct']:,} / {official['images']:,})"
        )
    lines.append(
        "per-class accuracy: "
        + "  ".join(f"{digit}: {entry['accuracy']:.4f}" for digit, entry in result["per_class"].items())
    )
    lines.append("confusion matrix (rows: true label, columns: predicted)")
    lines.append("      " + "".join(f"{digit:>6}" for digit in range(NUM_CLASSES)))
    for digit, row in enumerate(result["confusion_matrix"]):
        lines.append(f"{digit:>6}" + "".join(f"{count:>6}" for count in row))
    return "\n".join(lines)


def write_evaluation(result: dict, location: str) -> None:
    """Into a local path or a URI, whole or not at all."""
    parent, name = parent_and_name(location)
    Folder(parent).write_json(name, result)

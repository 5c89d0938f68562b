"""Small `ImageId,Label` files, Kaggle's submission and solution layout (and test_origin.csv's
like it): read whole (up to SMALL_CSV_BYTES), checked row by row, every bad cell named by row
and column."""

from __future__ import annotations

import csv
import io

import numpy as np

from digit_models.errors import DigitsError, first_line
from digit_models.storage.files import open_binary, read_at_most
from digit_models.storage.kaggle_csv import NUM_CLASSES, check_header

# About six million `ImageId,Label` rows (three million of test_origin.csv's), decompressed: a
# .csv.gz of a few kilobytes can hold gigabytes, which would otherwise be read whole.
SMALL_CSV_BYTES = 64 << 20


def read_id_label_csv(location: str, label_column: str = "Label") -> tuple[np.ndarray, np.ndarray]:
    """A small `ImageId,Label` file (Kaggle's submission and solution layout): ids unique and
    positive, labels digits 0-9. Bad rows are named by row and column."""
    name = str(location)
    columns = read_small_csv(location, ["ImageId", label_column])
    ids = _parse_column(columns["ImageId"], "ImageId", 1, 2**31 - 1, name)
    labels = _parse_column(columns[label_column], label_column, 0, NUM_CLASSES - 1, name)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        duplicate = unique[counts > 1][0]
        row = np.flatnonzero(ids == duplicate)[1]
        raise DigitsError(f"{name}: row {row + 1}, column ImageId: {duplicate} appears more than once")
    return ids, labels


def read_small_csv(location: str, expected: list[str]) -> dict[str, list[str]]:
    """A small CSV with exactly these columns, as text, checked row by row."""
    name = str(location)
    with open_binary(location) as stream:
        try:
            content = read_at_most(stream, SMALL_CSV_BYTES, name, "a labels or submission file")
            text = io.StringIO(content.decode("utf-8-sig"), newline="")
            rows = [row for row in csv.reader(text) if row]
        except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
            raise DigitsError(f"{name}: not a readable CSV file: {first_line(exc)}") from None
    if not rows:
        raise DigitsError(f"{name}: empty file, expected a CSV header")
    check_header(rows[0], expected, name)
    if len(rows) == 1:
        raise DigitsError(f"{name}: no data rows after the header")
    for number, row in enumerate(rows[1:], start=1):
        if len(row) != len(expected):
            raise DigitsError(f"{name}: row {number}: has {len(row)} columns, expected {len(expected)}")
    return {column: [row[i] for row in rows[1:]] for i, column in enumerate(expected)}


def _parse_column(cells: list[str], column: str, low: int, high: int, name: str) -> np.ndarray:
    for number, cell in enumerate(cells, start=1):
        if not (cell.isascii() and cell.isdigit()) or not low <= int(cell) <= high:
            shown = repr(cell[:20]) if cell else "blank cell"
            raise DigitsError(f"{name}: row {number}, column {column}: {shown} is not an integer {low}-{high}")
    return np.array(cells, dtype=np.int64)

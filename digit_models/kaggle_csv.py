"""Kaggle Digit Recognizer CSV files: read and validate, write, and split.

train.csv is `label,pixel0,...,pixel783`, test.csv the same without `label`; one image per row,
pixels are integers 0-255. Files may be local paths or URIs pyarrow can open (s3://, gs://),
optionally gzip'd (.csv.gz). A UTF-8 BOM and CRLF line endings are accepted.

Reading takes pyarrow's multithreaded parser straight to uint8 columns. When that parse fails
it says little about where, so the file is scanned again row by row to name the first bad
cell: the slow path runs only for files that are already known to be broken.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from digit_models.errors import DigitsError
from digit_models.files import filesystem, first_line, is_uri

PIXEL_COLUMNS = [f"pixel{i}" for i in range(784)]
TRAIN_COLUMNS = ["label", *PIXEL_COLUMNS]
TEST_COLUMNS = PIXEL_COLUMNS
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitImages:
    """Images with their ids: in a Kaggle CSV, row i (1-based) is ImageId i."""

    images: np.ndarray  # uint8, (n, 28, 28)
    labels: np.ndarray | None  # uint8, (n,); None for an unlabelled test set
    image_ids: np.ndarray  # int32, (n,)
    source: str

    def __len__(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------------------- opening files

def _require_file(location: str) -> tuple[pafs.FileSystem, str]:
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DigitsError(f"{location}: no such file")
    if info.type == pafs.FileType.Directory:
        raise DigitsError(f"{location}: is a directory, expected a CSV file")
    if not is_uri(location) and not os.access(path, os.R_OK):
        raise DigitsError(f"{location}: permission denied")
    return fs, path


def open_binary(location: str):
    """A readable byte stream; .gz files are decompressed transparently."""
    fs, path = _require_file(location)
    try:
        return fs.open_input_stream(path, compression="detect")
    except OSError as exc:
        raise DigitsError(f"{location}: cannot open: {first_line(exc)}") from None


def file_sha256(location: str) -> str:
    fs, path = _require_file(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:  # the bytes as stored, not decompressed
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_train_csv(data: str) -> str:
    """`--data` is a folder holding train.csv (what `digits data` writes) or the file itself."""
    fs, path = filesystem(data)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        for name in ("train.csv", "train.csv.gz"):
            candidate = data.rstrip("/") + "/" + name
            if fs.get_file_info(filesystem(candidate)[1]).type == pafs.FileType.File:
                return candidate
        raise DigitsError(f"{data}: folder has no train.csv")
    return data


# ---------------------------------------------------------------------------- reading

def read_train_csv(location: str, limit: int | None = None) -> DigitImages:
    return read_kaggle_csv(location, labelled=True, limit=limit)


def read_test_csv(location: str, limit: int | None = None) -> DigitImages:
    return read_kaggle_csv(location, labelled=False, limit=limit)


def read_kaggle_csv(location: str, labelled: bool, limit: int | None = None) -> DigitImages:
    expected = TRAIN_COLUMNS if labelled else TEST_COLUMNS
    name = str(location)
    with open_binary(location) as stream:
        try:
            header = _read_header(stream, name)
            _check_header(header, expected, name)
            table = pacsv.read_csv(
                stream,
                read_options=pacsv.ReadOptions(column_names=expected, block_size=8 << 20),
                convert_options=pacsv.ConvertOptions(
                    column_types={column: pa.uint8() for column in expected}),
            )
        except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as exc:
            _diagnose(location, expected)  # raises with the row and column
            raise DigitsError(f"{name}: {first_line(exc)}") from None
    if table.num_rows == 0:
        raise DigitsError(f"{name}: no data rows after the header")
    if any(column.null_count for column in table.columns):
        _diagnose(location, expected)
    if limit is not None:
        table = table.slice(0, limit)
    pixels = np.stack([table.column(c).to_numpy() for c in PIXEL_COLUMNS], axis=1)
    labels = None
    if labelled:
        labels = table.column("label").to_numpy()
        bad = np.flatnonzero(labels >= NUM_CLASSES)
        if len(bad):
            row = int(bad[0])
            raise DigitsError(f"{name}: row {row + 1}, column label: '{labels[row]}' is not a digit 0-9")
    return DigitImages(images=pixels.reshape(-1, 28, 28), labels=labels, source=name,
                       image_ids=np.arange(1, len(pixels) + 1, dtype=np.int32))


def read_test_set(location: str) -> DigitImages:
    """A test set to score: a Kaggle test.csv (.csv or .csv.gz; ImageId = row number) or a
    Parquet file or folder with pixel0..pixel783 and optionally its own ImageId column."""
    if str(location).rstrip("/").endswith((".parquet", ".pq")) or is_directory(location):
        return _read_test_parquet(location)
    return read_test_csv(location)


def is_directory(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _read_test_parquet(location: str) -> DigitImages:
    import pyarrow.dataset as pads

    name = str(location)
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DigitsError(f"{name}: no such file")
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        if not dataset.files:
            raise DigitsError(f"{name}: folder holds no Parquet files")
        table = dataset.to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DigitsError(f"{name}: not readable as Parquet: {first_line(exc)}") from None
    columns = [c for c in table.column_names if c != "ImageId"]
    _check_header(columns, TEST_COLUMNS, name)
    if table.num_rows == 0:
        raise DigitsError(f"{name}: no rows")
    pixels = np.empty((table.num_rows, 784), np.uint8)
    for i, column in enumerate(PIXEL_COLUMNS):
        pixels[:, i] = _checked_integers(table.column(column), column, 0, 255, name)
    if "ImageId" in table.column_names:
        ids = _checked_integers(table.column("ImageId"), "ImageId", 1, 2**31 - 1, name)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DigitsError(f"{name}: column ImageId: {unique[counts > 1][0]} appears more than once")
    else:
        ids = np.arange(1, table.num_rows + 1)
    return DigitImages(images=pixels.reshape(-1, 28, 28), labels=None, source=name,
                       image_ids=ids.astype(np.int32))


def _checked_integers(column: pa.ChunkedArray, name: str, low: int, high: int, source: str):
    """The column as an integer array, or an error naming the first bad row."""
    if not pa.types.is_integer(column.type):
        raise DigitsError(f"{source}: column {name}: type {column.type}, expected integers")
    values = column.to_numpy(zero_copy_only=False)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DigitsError(f"{source}: row {row + 1}, column {name}: missing value")
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        raise DigitsError(f"{source}: row {bad[0] + 1}, column {name}: {values[bad[0]]} is outside {low}-{high}")
    return values


def _read_header(stream, name: str) -> list[str]:
    """Consumes the header line and leaves the stream at the first data row."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = stream.read(1)
        if not byte:
            break
        line += byte
        if len(line) > 1 << 16:
            raise DigitsError(f"{name}: line 1 is not a CSV header (no newline in 64 KiB)")
    if not line.strip():
        raise DigitsError(f"{name}: empty file, expected a CSV header")
    text = bytes(line).decode("utf-8-sig", errors="replace").strip("\r\n")
    return next(csv.reader([text]))


def _check_header(header: list[str], expected: list[str], name: str) -> None:
    if header == expected:
        return
    seen = set()
    for column in header:
        if column in seen:
            raise DigitsError(f"{name}: header: column {column!r} appears more than once")
        seen.add(column)
    missing = [c for c in expected if c not in seen]
    extra = [c for c in header if c not in set(expected)]
    if missing == ["label"] and not extra:
        raise DigitsError(f"{name}: header: no 'label' column (is this a test file? "
                          "training needs labelled rows)")
    if extra == ["label"] and not missing:
        raise DigitsError(f"{name}: header: unexpected 'label' column (is this a training file?)")
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column{'s' if len(missing) > 1 else ''} "
                         + ", ".join(repr(c) for c in missing[:3]) + (" ..." if len(missing) > 3 else ""))
        if extra:
            parts.append(f"unexpected column{'s' if len(extra) > 1 else ''} "
                         + ", ".join(repr(c) for c in extra[:3]) + (" ..." if len(extra) > 3 else ""))
        raise DigitsError(f"{name}: header: " + "; ".join(parts)
                          + f" (expected {expected[0]},...,{expected[-1]})")
    position = next(i for i, (got, want) in enumerate(zip(header, expected)) if got != want)
    raise DigitsError(f"{name}: header: column {position + 1} is {header[position]!r}, "
                      f"expected {expected[position]!r} (columns out of order)")


def _diagnose(location: str, expected: list[str]) -> None:
    """Finds the first bad row of a file whose fast parse failed, and raises naming it."""
    name = str(location)
    labelled = expected[0] == "label"
    try:
        with open_binary(location) as stream:
            text = io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8-sig", newline="")
            rows = csv.reader(text)
            next(rows)  # the header was checked already
            row_number = 0
            for row in rows:
                if not row:
                    continue  # blank lines are skipped, as the fast parser skips them
                row_number += 1
                _check_row(row, row_number, expected, labelled, name)
            if row_number == 0:
                raise DigitsError(f"{name}: no data rows after the header")
    except UnicodeDecodeError:
        raise DigitsError(f"{name}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DigitsError(f"{name}: malformed CSV: {exc}") from None
    except (OSError, EOFError) as exc:
        raise DigitsError(f"{name}: cannot read: {first_line(exc)}") from None


def _check_row(row: list[str], row_number: int, expected: list[str], labelled: bool, name: str):
    where = f"{name}: row {row_number}"
    if len(row) != len(expected):
        raise DigitsError(f"{where}: has {len(row)} columns, expected {len(expected)}")
    if "".join(row).isdigit() and all(row) and max(map(len, row)) <= 3:
        values = [int(cell) for cell in row]
        if max(values) <= 255 and (not labelled or values[0] < NUM_CLASSES):
            return
    for column, cell in zip(expected, row):
        if cell == "":
            raise DigitsError(f"{where}, column {column}: blank cell")
        limit = NUM_CLASSES - 1 if column == "label" else 255
        if not (cell.isascii() and cell.isdigit()) or int(cell) > limit:
            kind = "a digit 0-9" if column == "label" else "an integer pixel value 0-255"
            raise DigitsError(f"{where}, column {column}: {cell[:20]!r} is not {kind}")


# ---------------------------------------------------------------------------- writing

def write_kaggle_csv(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes Kaggle's exact layout: unquoted header, integers, LF line endings."""
    pixels = images.reshape(len(images), 784)
    columns = TRAIN_COLUMNS if labels is not None else TEST_COLUMNS
    arrays = ([pa.array(labels, pa.uint8())] if labels is not None else []) + \
        [pa.array(pixels[:, i]) for i in range(784)]
    with open(path, "wb") as f:
        f.write((",".join(columns) + "\n").encode())
        pacsv.write_csv(pa.Table.from_arrays(arrays, names=columns), f,
                        write_options=pacsv.WriteOptions(include_header=False))


# ---------------------------------------------------------------------------- splitting

def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded row indices (train, validation); the validation part is round(n * fraction)."""
    if not 0.0 <= fraction < 1.0:
        raise DigitsError(f"--val-fraction {fraction}: must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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
            text = io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8-sig", newline="")
            rows = [row for row in csv.reader(text) if row]
        except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
            raise DigitsError(f"{name}: not a readable CSV file: {first_line(exc)}") from None
    if not rows:
        raise DigitsError(f"{name}: empty file, expected a CSV header")
    _check_header(rows[0], expected, name)
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

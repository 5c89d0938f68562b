"""Kaggle Digit Recognizer CSV files: read and validate, count, write.

train.csv is `label,pixel0,...,pixel783`, test.csv the same without `label`; one image per row,
pixels are integers 0-255. Files may be local paths or URIs pyarrow can open (s3://, gs://),
optionally gzip'd (.csv.gz). A UTF-8 BOM, CRLF line endings and blank lines (up to
MAX_BLANK_LINES) are accepted.

A file is read in chunks of whole lines, each parsed by pyarrow straight into uint8 columns, so
memory stays flat however long the file is. A parse failure says little about where, so only
the chunk that failed is scanned again row by row to name the first bad cell: the slow path
runs on a few thousand rows already known to hold an error, however deep in the file it is.

Rows are numbered from 1 after the header, not counting blank lines (Kaggle's ImageId).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from digit_models.errors import DigitsError, first_line
from digit_models.storage.files import Folder, open_binary, require_file

PIXEL_COLUMNS = [f"pixel{i}" for i in range(784)]
TRAIN_COLUMNS = ["label", *PIXEL_COLUMNS]
TEST_COLUMNS = PIXEL_COLUMNS
NUM_CLASSES = 10
CHUNK_BYTES = 8 << 20  # about 5,000 rows: a Ray Data block of a useful size
MAX_LINE_BYTES = 1 << 20  # a row of 785 cells is under 4 KiB; far longer is not our CSV
# Blank lines are skipped, but not without end: a .csv.gz of nothing but newlines (kilobytes
# for gigabytes) would keep every reader busy for as long as it decompresses. A million is far
# beyond any real file's few, and reading them costs a few megabytes.
MAX_BLANK_LINES = 1 << 20


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


def resolve_train_csv(data: str) -> str:
    """`--data` is a folder holding train.csv (what `digits data` writes) or the file itself."""
    folder = Folder(data)
    if folder.is_folder():
        for name in ("train.csv", "train.csv.gz"):
            if folder.is_file(name):
                return folder.child(name)
        raise DigitsError(f"{data}: folder has no train.csv")
    return data


# ---------------------------------------------------------------------------- reading


def read_train_csv(location: str, limit: int | None = None) -> DigitImages:
    return read_kaggle_csv(location, labelled=True, limit=limit)


def read_test_csv(location: str, limit: int | None = None) -> DigitImages:
    return read_kaggle_csv(location, labelled=False, limit=limit)


def read_kaggle_csv(location: str, labelled: bool, limit: int | None = None) -> DigitImages:
    """A whole file in memory, as one array."""
    chunks = read_image_chunks(location, labelled, limit=limit)
    images = np.concatenate([images for images, _ in chunks])
    return DigitImages(
        images=images,
        source=str(location),
        labels=np.concatenate([labels for _, labels in chunks]) if labelled else None,
        image_ids=np.arange(1, len(images) + 1, dtype=np.int32),
    )


def read_image_chunks(
    location: str, labelled: bool, limit: int | None = None
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """A whole file in memory as (images, labels or None) arrays, a chunk of its rows each
    (read_csv_chunks'), in file order: the rows once, for a reader that hands them on a chunk
    at a time rather than joining them."""
    return list(image_chunks(location, labelled, limit=limit))


def image_chunks(
    location: str, labelled: bool, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """read_image_chunks' chunks one at a time, as they are read."""
    for _, table in read_csv_chunks(location, labelled, limit=limit):
        yield pixels_of(table), table.column("label").to_numpy() if labelled else None


def pixels_of(table: pa.Table) -> np.ndarray:
    """The pixel columns as (n, 28, 28) uint8 images."""
    # np.stack copies in a cache-friendly order; filling the result's strided columns one at a
    # time is several times slower.
    columns = [table.column(column).to_numpy() for column in PIXEL_COLUMNS]
    return np.stack(columns, axis=1).reshape(-1, 28, 28)


def read_csv_chunks(
    location: str, labelled: bool, limit: int | None = None, threads: bool = True
) -> Iterator[tuple[int, pa.Table]]:
    """Yields (rows before the chunk, the chunk's rows as uint8 columns), every cell checked."""
    name = str(location)
    try:
        with open_binary(location) as stream:
            yield from csv_stream_chunks(stream, name, labelled, limit=limit, threads=threads)
    except (OSError, EOFError) as exc:
        raise DigitsError(f"{name}: cannot read: {first_line(exc)}") from None


def csv_stream_chunks(
    stream, name: str, labelled: bool, limit: int | None = None, threads: bool = True
) -> Iterator[tuple[int, pa.Table]]:
    """read_csv_chunks of an open binary stream (`digits serve` reads a request's body so);
    `name` is how errors refer to it."""
    expected = TRAIN_COLUMNS if labelled else TEST_COLUMNS
    rows = 0
    chunks = line_chunks(stream, name)
    check_header(_header(next(chunks, b""), name), expected, name)
    for chunk in chunks:
        table = _parse_chunk(chunk, expected, name, rows, threads)
        if limit is not None and rows + table.num_rows >= limit:
            yield rows, table.slice(0, limit - rows)
            return
        if table.num_rows:
            yield rows, table
        rows += table.num_rows
    if rows == 0:
        raise DigitsError(f"{name}: no data rows after the header")


def line_chunks(stream, name: str) -> Iterator[bytes]:
    """The stream's bytes in chunks of whole lines, each ending in a newline; the first chunk is
    the header line alone. A last line without its newline gets one. More than MAX_BLANK_LINES
    blank lines in all are an error."""
    pending = b""
    header_done = False
    blank_lines = 0

    def counted(chunk: bytes) -> bytes:
        nonlocal blank_lines
        blank_lines += int(_blank_lines(chunk).sum())
        if blank_lines > MAX_BLANK_LINES:
            raise DigitsError(f"{name}: more than {MAX_BLANK_LINES:,} blank lines; not a Kaggle digits CSV")
        return chunk

    while True:
        block = stream.read(CHUNK_BYTES)
        data = pending + block
        if not block:
            if data:
                yield counted(data if data.endswith(b"\n") else data + b"\n")
            return
        if not header_done:
            end = data.find(b"\n")
            if end < 0:
                if len(data) > MAX_LINE_BYTES:
                    raise DigitsError(f"{name}: line 1 is not a CSV header (no newline in {MAX_LINE_BYTES >> 20} MiB)")
                pending = data
                continue
            header_done = True
            yield data[: end + 1]
            data = data[end + 1 :]
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) > MAX_LINE_BYTES:
            raise DigitsError(f"{name}: a line longer than {MAX_LINE_BYTES >> 20} MiB; not a Kaggle digits CSV")
        if cut:
            yield counted(data[:cut])
        pending = data[cut:]


def _header(line: bytes, name: str) -> list[str]:
    text = line.decode("utf-8-sig", errors="replace").strip("\r\n")
    if not text.strip():
        raise DigitsError(f"{name}: empty file, expected a CSV header")
    return next(csv.reader([text]))


def _parse_chunk(chunk: bytes, expected: list[str], name: str, rows_before: int, threads: bool) -> pa.Table:
    try:
        table = pacsv.read_csv(
            pa.BufferReader(chunk),
            read_options=pacsv.ReadOptions(column_names=expected, use_threads=threads),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.uint8() for c in expected}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        _diagnose(chunk, expected, name, rows_before)  # raises with the row and column
        raise DigitsError(f"{name}: {first_line(exc)}") from None
    if any(column.null_count for column in table.columns):
        _diagnose(chunk, expected, name, rows_before)
    if "label" in expected:
        labels = table.column("label").to_numpy()
        bad = np.flatnonzero(labels >= NUM_CLASSES)
        if len(bad):
            raise DigitsError(
                f"{name}: row {rows_before + bad[0] + 1}, column label: '{labels[bad[0]]}' is not a digit 0-9"
            )
    return table


def _diagnose(chunk: bytes, expected: list[str], name: str, rows_before: int) -> None:
    """Finds the first bad row of a chunk whose fast parse failed, and raises naming it."""
    row_number = rows_before
    for line in chunk.split(b"\n"):
        if not line.strip(b"\r"):
            continue  # blank lines are skipped, as the fast parser skips them
        row_number += 1
        try:
            row = next(csv.reader([line.decode("utf-8").rstrip("\r")]))
        except UnicodeDecodeError:
            raise DigitsError(f"{name}: row {row_number}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DigitsError(f"{name}: row {row_number}: malformed CSV: {exc}") from None
        _check_row(row, row_number, expected, name)


def _check_row(row: list[str], row_number: int, expected: list[str], name: str) -> None:
    where = f"{name}: row {row_number}"
    if len(row) != len(expected):
        raise DigitsError(f"{where}: has {len(row)} columns, expected {len(expected)}")
    for column, cell in zip(expected, row):
        if cell == "":
            raise DigitsError(f"{where}, column {column}: blank cell")
        limit = NUM_CLASSES - 1 if column == "label" else 255
        if not (cell.isascii() and cell.isdigit()) or int(cell) > limit:
            kind = "a digit 0-9" if column == "label" else "an integer pixel value 0-255"
            raise DigitsError(f"{where}, column {column}: {cell[:20]!r} is not {kind}")


def check_header(header: list[str], expected: list[str], name: str) -> None:
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
        raise DigitsError(f"{name}: header: no 'label' column (is this a test file? training needs labelled rows)")
    if extra == ["label"] and not missing:
        raise DigitsError(f"{name}: header: unexpected 'label' column (is this a training file?)")
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing column{'s' if len(missing) > 1 else ''} "
                + ", ".join(repr(c) for c in missing[:3])
                + (" ..." if len(missing) > 3 else "")
            )
        if extra:
            parts.append(
                f"unexpected column{'s' if len(extra) > 1 else ''} "
                + ", ".join(repr(c) for c in extra[:3])
                + (" ..." if len(extra) > 3 else "")
            )
        raise DigitsError(f"{name}: header: " + "; ".join(parts) + f" (expected {expected[0]},...,{expected[-1]})")
    position = next(i for i, (got, want) in enumerate(zip(header, expected)) if got != want)
    raise DigitsError(
        f"{name}: header: column {position + 1} is {header[position]!r}, "
        f"expected {expected[position]!r} (columns out of order)"
    )


def read_csv_header(location: str) -> list[str]:
    """The header's column names, reading no further than the first line."""
    name = str(location)
    try:
        with open_binary(location) as stream:
            return _header(next(line_chunks(_Prefix(stream), name), b""), name)
    except (OSError, EOFError) as exc:
        raise DigitsError(f"{name}: cannot read: {first_line(exc)}") from None


class _Prefix:
    """A stream read in small pieces: finding the header of a large remote file must not
    download a whole chunk."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, size: int) -> bytes:
        return self.stream.read(min(size, 64 << 10))


# ---------------------------------------------------------------------------- counting


def count_csv_rows(location: str) -> dict:
    """Data rows (as the reader numbers them), byte size and sha256 of the bytes as stored,
    in one pass over the file."""
    fs, path = require_file(location)
    name = str(location)
    hashing = _HashingReader(fs.open_input_stream(path, compression=None))
    stream = gzip.GzipFile(fileobj=hashing) if path.endswith(".gz") else hashing  # the path: no URI query
    lines = 0
    try:
        with hashing.raw:
            for chunk in line_chunks(stream, name):
                lines += count_lines(chunk)
            while hashing.read(CHUNK_BYTES):  # a gzip trailer the decompressor did not need
                pass
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DigitsError(f"{name}: cannot read: {first_line(exc)}") from None
    return {"rows": max(lines - 1, 0), "bytes": hashing.size, "sha256": hashing.digest.hexdigest()}


def count_lines(chunk: bytes) -> int:
    """Non-blank lines in a chunk of whole lines: those the CSV parser makes rows of."""
    blank = _blank_lines(chunk)
    return int(len(blank) - blank.sum())


def _blank_lines(chunk: bytes) -> np.ndarray:
    """For each line of a chunk of whole lines, whether it is blank (empty or a lone CR), as
    the CSV parser, which skips those, sees it."""
    if not chunk:
        return np.zeros(0, bool)
    data = np.frombuffer(chunk, np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts
    return (lengths == 0) | ((lengths == 1) & (data[np.minimum(starts, len(data) - 1)] == ord("\r")))


class _HashingReader:
    def __init__(self, raw):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


# ---------------------------------------------------------------------------- writing


def write_kaggle_csv(path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes Kaggle's exact layout: unquoted header, integers, LF line endings."""
    pixels = images.reshape(len(images), 784)
    columns = TRAIN_COLUMNS if labels is not None else TEST_COLUMNS
    arrays = ([pa.array(labels, pa.uint8())] if labels is not None else []) + [
        pa.array(pixels[:, i]) for i in range(784)
    ]
    with open(path, "wb") as f:
        f.write((",".join(columns) + "\n").encode())
        pacsv.write_csv(
            pa.Table.from_arrays(arrays, names=columns), f, write_options=pacsv.WriteOptions(include_header=False)
        )

"""What `digits predict` scores: a Kaggle test.csv (.csv or .csv.gz), a Parquet file
(pixel0..pixel783, optionally its own ImageId), a folder of such files or a glob, local or
behind a URI (s3://, gs://, file://).

The driver only lists the files and checks their headers, before Ray starts. The rows are read,
validated and numbered by Ray Data read tasks, one per file, streaming a few thousand rows at a
time, so no process ever holds the whole input. ImageIds are a Parquet file's own ImageId
column, else the row number counted across the files in name order: Kaggle's numbering for a
single test.csv. A file's first number depends on how many rows the files before it hold, which
a light pass counts (`inspect_file`, which also takes each file's sha256 for the record).
"""

from __future__ import annotations

import fnmatch
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from digit_models.errors import DigitsError, first_line
from digit_models.runtime.process_memory import return_freed_memory
from digit_models.storage.files import file_sha256, filesystem, require_file, split_query
from digit_models.storage.kaggle_csv import (
    PIXEL_COLUMNS,
    TEST_COLUMNS,
    check_header,
    count_csv_rows,
    pixels_of,
    read_csv_chunks,
    read_csv_header,
)

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 4096
BLOCK_ROWS = 8192  # rows per Ray Data block: a multiple of every usual batch size
MAX_IMAGE_ID = 2**31 - 1
# The most a value of a numeric column (8 bytes at most) can take in a row group, uncompressed:
# a dictionary entry and its index, with room for levels and page statistics; and per column
# chunk, for its page headers. A row group claiming more for its rows is damaged or crafted
# (a small file that decompresses to gigabytes), and is refused before it is read.
PARQUET_VALUE_BYTES = 24
PARQUET_CHUNK_BYTES = 64 << 10


@dataclass(frozen=True)
class PredictInput:
    location: str  # as the user gave it
    kind: str  # "csv" or "parquet"
    files: list[str]  # in ImageId order
    sizes: list[int]
    own_ids: bool  # Parquet files carrying an ImageId column

    @property
    def image_bytes(self) -> int:
        """About how many bytes the images take in memory."""
        return sum(_in_memory_bytes(self.kind, size) for size in self.sizes)


def open_input(location: str) -> PredictInput:
    """The input's files, each with a readable header (CSV) or schema (Parquet) of the right
    columns. Reads no rows."""
    files, sizes = _list_files(str(location))
    kinds = {_kind(file) for file in files}
    if len(kinds) > 1:
        raise DigitsError(f"{location}: mixes CSV and Parquet files; score them separately")
    kind = kinds.pop()
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        own_ids = list(pool.map(_check_csv_header if kind == "csv" else _check_parquet_schema, files))
    if kind == "parquet":
        return_freed_memory()  # what parsing the footers left with the allocator
    if len(set(own_ids)) > 1:
        with_ids = files[own_ids.index(True)]
        raise DigitsError(
            f"{location}: {with_ids} has an ImageId column and "
            f"{files[own_ids.index(False)]} has none; give every file one or none"
        )
    return PredictInput(location=str(location), kind=kind, files=files, sizes=sizes, own_ids=own_ids[0])


def _list_files(location: str) -> tuple[list[str], list[int]]:
    # A URI's query (the store's settings) is neither part of a glob nor of a file's name;
    # every file listed carries it, so that each is opened with the same settings.
    base, query = split_query(location)
    fs, path = filesystem(location)
    if any(char in base for char in "*?["):
        base_location = base[: min(base.index(c) for c in "*?[" if c in base)]
        base_location = base_location[: base_location.rfind("/") + 1] or "./"
        pattern = base
    else:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            require_file(location)  # there and readable
            if _kind(location) is None:
                raise DigitsError(f"{location}: expected a .csv, .csv.gz, .parquet or .pq file")
            return [location], [info.size]
        base_location, pattern = base.rstrip("/") + "/", None
    base_fs, base_path = filesystem(base_location + query)
    try:
        infos = base_fs.get_file_info(pafs.FileSelector(base_path.rstrip("/") or "/", recursive=True))
    except FileNotFoundError:
        infos = []
    except OSError as exc:
        raise DigitsError(f"{location}: cannot list: {first_line(exc)}") from None
    found = []
    for info in infos:
        relative = info.path[len(base_path.rstrip("/")) + 1 :]
        child = base_location.rstrip("/") + "/" + relative
        hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
        if (
            info.type == pafs.FileType.File
            and not hidden
            and _kind(child)
            and (pattern is None or fnmatch.fnmatchcase(child, pattern))
        ):
            found.append((child + query, info.size))
    if not found:
        what = "folder holds" if pattern is None else "pattern matches"
        raise DigitsError(f"{location}: {what} no .csv, .csv.gz, .parquet or .pq files")
    found.sort()
    return [child for child, _ in found], [size for _, size in found]


def _kind(location: str) -> str | None:
    name = split_query(location)[0].lower()
    return "csv" if name.endswith(CSV_SUFFIXES) else "parquet" if name.endswith(PARQUET_SUFFIXES) else None


def _check_csv_header(location: str) -> bool:
    check_header(read_csv_header(location), TEST_COLUMNS, location)
    return False


def _check_parquet_schema(location: str) -> bool:
    fs, path = require_file(location)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DigitsError(f"{location}: not readable as Parquet: {first_line(exc)}") from None
    check_header([name for name in schema.names if name != "ImageId"], TEST_COLUMNS, location)
    for field in schema:
        if not pa.types.is_integer(field.type):
            raise DigitsError(f"{location}: column {field.name}: type {field.type}, expected integers")
    return "ImageId" in schema.names


# ---------------------------------------------------------------------------- the read side


def inspect_file(kind: str, location: str) -> dict:
    """A file's rows, bytes and sha256: a light pass (no parsing) that tells each file where
    its ImageIds start, and the driver how many images to expect."""
    if kind == "csv":
        return count_csv_rows(location)
    fs, path = require_file(location)
    try:
        rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DigitsError(f"{location}: not readable as Parquet: {first_line(exc)}") from None
    return {"rows": rows, "bytes": fs.get_file_info(path).size, "sha256": file_sha256(location)}


def read_file(kind: str, location: str, first_id: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ImageIds, images) of one file, a few thousand rows at a time, every value checked.
    ImageIds are numbered on from first_id, or the file's own (first_id None)."""
    if kind == "csv":
        for rows_before, table in read_csv_chunks(location, labelled=False, threads=False):
            ids = np.arange(first_id + rows_before, first_id + rows_before + table.num_rows, dtype=np.int32)
            yield ids, pixels_of(table)
    else:
        yield from _read_parquet(location, first_id)


def _read_parquet(location: str, first_id: int | None):
    fs, path = require_file(location)
    rows_before = 0
    columns = PIXEL_COLUMNS + (["ImageId"] if first_id is None else [])
    try:
        parquet = pq.ParquetFile(path, filesystem=fs)
        require_plausible_row_groups(parquet.metadata, columns, location)
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        for batch in batches:
            pixels = np.stack(
                [_checked(batch.column(column), column, 0, 255, location, rows_before) for column in PIXEL_COLUMNS],
                axis=1,
            ).astype(np.uint8, copy=False)
            if first_id is None:
                ids = _checked(batch.column("ImageId"), "ImageId", 1, MAX_IMAGE_ID, location, rows_before)
            else:
                ids = np.arange(first_id + rows_before, first_id + rows_before + batch.num_rows)
            yield ids.astype(np.int32), pixels.reshape(-1, 28, 28)
            rows_before += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DigitsError(f"{location}: not readable as Parquet: {first_line(exc)}") from None


def require_plausible_row_groups(metadata: pq.FileMetaData, columns: list[str], location: str) -> None:
    """A Parquet file's row groups, from its footer alone: they hold the rows the file counts,
    and none of these columns takes more bytes than its rows can need."""
    groups = [metadata.row_group(index) for index in range(metadata.num_row_groups)]
    if sum(group.num_rows for group in groups) != metadata.num_rows:
        raise DigitsError(
            f"{location}: its row groups hold {sum(group.num_rows for group in groups):,} "
            f"rows, its footer counts {metadata.num_rows:,}"
        )
    for number, group in enumerate(groups, start=1):
        for chunk in (group.column(index) for index in range(group.num_columns)):
            if (
                chunk.path_in_schema in columns
                and chunk.total_uncompressed_size > group.num_rows * PARQUET_VALUE_BYTES + PARQUET_CHUNK_BYTES
            ):
                raise DigitsError(
                    f"{location}: row group {number}, column {chunk.path_in_schema}: "
                    f"{chunk.total_uncompressed_size:,} bytes for "
                    f"{group.num_rows:,} row{'' if group.num_rows == 1 else 's'}, "
                    "more than numbers take"
                )


def _checked(column: pa.Array, name: str, low: int, high: int, source: str, rows_before: int) -> np.ndarray:
    """The column as integers, or an error naming the first bad row."""
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DigitsError(f"{source}: row {rows_before + row + 1}, column {name}: missing value")
    values = column.to_numpy()
    if column.type == pa.uint8() and (low, high) == (0, 255):
        return values  # the type holds no other values
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        raise DigitsError(
            f"{source}: row {rows_before + bad[0] + 1}, column {name}: {values[bad[0]]} is outside {low}-{high}"
        )
    return values


def read_images(source: PredictInput, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """The images with these ImageIds, read in this process (for a report's few mistakes)."""
    wanted_set, found, next_id = set(int(i) for i in wanted), {}, 1
    for location in source.files:
        for ids, images in read_file(source.kind, location, None if source.own_ids else next_id):
            for position in np.flatnonzero(np.isin(ids, wanted)):
                found[int(ids[position])] = images[position]
            next_id += len(ids)
        if wanted_set <= found.keys():
            break
    return found


class Inspections:
    """Every file's `inspect_file`, run by a few Ray tasks over contiguous groups of files (a
    task per file could start hundreds of processes for a folder of many small files)."""

    def __init__(self, source: PredictInput, tasks: int, **task_options):
        import ray

        inspect_group = ray.remote(_inspect_group)
        self.bounds = sorted(
            set(np.linspace(0, len(source.files), min(tasks, len(source.files)) + 1, dtype=int).tolist())
        )
        self.refs = [
            inspect_group.options(num_cpus=0, **task_options).remote(source.kind, source.files[a:b])
            for a, b in zip(self.bounds, self.bounds[1:])
        ]

    def first(self, count: int) -> list[dict]:
        """The inspections of the first `count` files, waiting for them if need be."""
        import ray

        groups = ray.get([ref for start, ref in zip(self.bounds, self.refs) if start < count])
        for group in groups:
            if isinstance(group, DigitsError):
                raise group
        return [found for group in groups for found in group][:count]

    def rows_if_counted(self) -> int | None:
        """The rows of all files, or None while some are still being counted."""
        import ray

        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        if len(ready) < len(self.refs):
            return None
        groups = ray.get(self.refs)
        if any(isinstance(group, DigitsError) for group in groups):
            return None  # the pipeline stops on it
        return sum(found["rows"] for group in groups for found in group)


def _inspect_group(kind: str, files: list[str]) -> list[dict] | DigitsError:
    """The inspections of a group of files, or the error that stopped them, returned rather
    than raised: the read task of the same file usually stops on it first, and a task's raised
    error that nobody fetches is printed by Ray, traceback and all, beside our one line."""
    try:
        return [inspect_file(kind, file) for file in files]
    except DigitsError as exc:
        return exc


def images_datasource(source: PredictInput, inspections: Inspections):
    """A Ray Data datasource reading `source` one file per read task. A task numbering rows
    waits for the inspections of the files before its own, and checks its own file's row
    count against its inspection."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from ray.data.extensions import ArrowTensorArray

    def read(index: int):
        location = source.files[index]
        first_id = None
        if not source.own_ids:
            first_id = 1 + sum(found["rows"] for found in inspections.first(index))
        rows = 0
        for ids, images in _reblocked(read_file(source.kind, location, first_id), BLOCK_ROWS):
            rows += len(ids)
            yield pa.table({"ImageId": pa.array(ids, pa.int32()), "image": ArrowTensorArray.from_numpy(images)})
        counted = inspections.first(index + 1)[index]["rows"]
        if rows != counted:
            raise DigitsError(f"{location}: changed while it was read ({rows} rows, {counted} counted before)")

    class ImagesDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return source.image_bytes

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    lambda index=index: read(index),
                    BlockMetadata(
                        num_rows=None,
                        exec_stats=None,
                        input_files=[location],
                        size_bytes=_in_memory_bytes(source.kind, size),
                    ),
                )
                for index, (location, size) in enumerate(zip(source.files, source.sizes))
            ]

    return ImagesDatasource()


def _reblocked(parts, rows: int):
    """The (ids, images) parts regrouped into blocks of exactly `rows` rows (the last one
    shorter): whole batches for the scoring actors, whatever the chunks' sizes."""
    ids, images, held = [], [], 0
    for part_ids, part_images in parts:
        ids.append(part_ids)
        images.append(part_images)
        held += len(part_ids)
        while held >= rows:
            all_ids, all_images = np.concatenate(ids), np.concatenate(images)
            yield all_ids[:rows], all_images[:rows]
            ids, images, held = [all_ids[rows:]], [all_images[rows:]], held - rows
    if held:
        yield np.concatenate(ids), np.concatenate(images)


def _in_memory_bytes(kind: str, size: int) -> int:
    # A CSV row of 784 pixels is about 1.7 KB of text for 784 bytes of image; Parquet
    # compresses MNIST's mostly-zero pixels about 3x.
    return int(size * (0.5 if kind == "csv" else 3))

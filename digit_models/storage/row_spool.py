"""Rows parsed once, kept on this machine's disk until the command ends.

`digits train` checks every cell of train.csv before Ray starts, and puts the rows into Ray's
object store after. Held in the driver's memory in between, and then mapped by it while it put
them, they made the driver as large as the rows themselves, however large train.csv grew.
Spooled a chunk per file instead, the driver holds one chunk at a time, and a task on its node
reads the files back into the object store (training/driver.py).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from digit_models.errors import DigitsError, first_line


# Rows per object that the spool's rows are put into the store as (split_parts). The driver owns
# every such object, and each worker that reads one borrows it: the driver's own memory grows
# with the number of objects times their borrowers (docs/design.md, "How it grows"), so a part
# is many chunks of the file, at the price of that many rows in the putting task's memory.
PART_ROWS = 40_000


@dataclass(frozen=True)
class RowSpool:
    directory: str
    lengths: tuple[int, ...]  # rows of each chunk, in the file's order
    part_rows: int = PART_ROWS

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of that chunk."""
        return np.load(_path(self.directory, index, "images")), np.load(_path(self.directory, index, "labels"))

    def parts(self) -> list[range]:
        """The chunks in runs of at least part_rows rows (the last run may have fewer), in order."""
        runs, first, rows = [], 0, 0
        for index, length in enumerate(self.lengths):
            rows += length
            if rows >= self.part_rows:
                runs.append(range(first, index + 1))
                first, rows = index + 1, 0
        if first < len(self.lengths):
            runs.append(range(first, len(self.lengths)))
        return runs


@contextmanager
def spooled(chunks: Iterable[tuple[np.ndarray, np.ndarray]], what: str) -> Iterator[RowSpool]:
    """The (images, labels) chunks, each written to a new folder in the system's temporary
    folder (TMPDIR) as it comes; the folder is removed when the block ends. `what`: the rows'
    source, for the error when the folder has no room."""
    try:
        directory = tempfile.mkdtemp(prefix="digits-rows-")
    except OSError as exc:
        raise _no_room(tempfile.gettempdir(), what, exc) from None
    try:
        lengths = []
        for index, (images, labels) in enumerate(chunks):
            try:
                _save(_path(directory, index, "images"), images)
                _save(_path(directory, index, "labels"), labels)
            except OSError as exc:
                raise _no_room(directory, what, exc) from None
            lengths.append(len(images))
        yield RowSpool(directory, tuple(lengths))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _no_room(directory: str, what: str, exc: OSError) -> DigitsError:
    return DigitsError(
        f"{directory}: cannot keep the rows read from {what} there ({first_line(exc)}); TMPDIR chooses another folder"
    )


def validation_count(n: int, fraction: float) -> int:
    return int(round(n * fraction))


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded row numbers (train, validation), each sorted: validation_count(n, fraction) of
    them are the validation rows."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = validation_count(n, fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_parts(spool: RowSpool, val_fraction: float, seed: int) -> Iterator[np.ndarray]:
    """The validation rows' numbers in the file (validation_split's), then for each of
    spool.parts() its training images and labels and its validation images and labels. A
    generator, so that a Ray task that returns them has Ray store each as it comes, not all of
    them at the end (training/driver.py)."""
    train_rows, val_rows = validation_split(spool.rows, val_fraction, seed)
    yield val_rows
    start = 0
    for part in spool.parts():
        chunks = [spool.chunk(index) for index in part]
        images = np.concatenate([chunk_images for chunk_images, _ in chunks])
        labels = np.concatenate([chunk_labels for _, chunk_labels in chunks])
        del chunks
        end = start + len(images)
        for rows in (train_rows, val_rows):
            here = rows[np.searchsorted(rows, start) : np.searchsorted(rows, end)] - start
            yield images[here]
            yield labels[here]
        start = end


def _save(path: str, array: np.ndarray) -> None:
    # Through Python's write, which says when the disk is full; numpy's own says only how
    # many bytes it wrote of how many.
    staged = io.BytesIO()
    np.save(staged, array)
    with open(path, "wb") as out:
        out.write(staged.getbuffer())


def _path(directory: str, index: int, part: str) -> str:
    return os.path.join(directory, f"{index:06d}-{part}.npy")

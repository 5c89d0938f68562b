"""The input side of `digits predict`, in-process: file listing, header checks, chunked reading
and the row count that numbers the ImageIds (Ray Data runs these same functions in its read
tasks; tests/test_scoring.py runs them there)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from digit_models.storage import kaggle_csv

from digit_models.scoring import predict_input
from digit_models.errors import DigitsError
from digit_models.storage.kaggle_csv import PIXEL_COLUMNS, count_csv_rows, read_csv_chunks, read_test_csv
from digit_models.scoring.predict_input import inspect_file, open_input, read_file, read_images


@pytest.fixture(scope="module")
def test_lines(kaggle_dir) -> list[str]:
    return (kaggle_dir / "test.csv").read_text().splitlines()


def _write(path: Path, lines: list[str], newline: str = "\n") -> str:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return str(path)


def test_small_chunks_give_the_same_rows_and_locate_a_bad_cell_deep_in_the_file(tmp_path, test_lines, monkeypatch):
    monkeypatch.setattr(kaggle_csv, "CHUNK_BYTES", 20_000)  # about ten rows per chunk
    path = _write(tmp_path / "test.csv", test_lines)
    chunks = list(read_csv_chunks(path, labelled=False))
    assert len(chunks) > 100 and [rows for rows, _ in chunks][:2] == [0, chunks[0][1].num_rows]
    whole = read_test_csv(path)
    assert np.array_equal(np.concatenate([kaggle_csv.pixels_of(t) for _, t in chunks]), whole.images)

    bad = list(test_lines)
    cells = bad[1234].split(",")
    cells[500] = "x"
    bad[1234] = ",".join(cells)
    with pytest.raises(DigitsError, match=r"test.csv: row 1234, column pixel500: 'x' is not an integer"):
        list(read_csv_chunks(_write(tmp_path / "test.csv", bad), labelled=False))


def test_the_row_count_matches_the_parser_with_blank_lines_crlf_bom_and_gzip(tmp_path, test_lines, monkeypatch):
    monkeypatch.setattr(kaggle_csv, "CHUNK_BYTES", 30_000)
    rows = test_lines[:301]
    with_blanks = [rows[0], "", *rows[1:100], "", "", *rows[100:]]
    variants = {
        "blank-lines.csv": ("\n".join(with_blanks) + "\n\n").encode(),
        "crlf.csv": "\r\n".join(with_blanks).encode(),  # and no newline at the end
        "bom.csv": b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n",
        "packed.csv.gz": gzip.compress("\n".join(rows).encode() + b"\n"),
    }
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
        counted = count_csv_rows(str(tmp_path / name))
        parsed = sum(table.num_rows for _, table in read_csv_chunks(str(tmp_path / name), labelled=False))
        assert counted["rows"] == parsed == 300, name
        assert counted["bytes"] == len(content), name


def test_a_gzip_of_blank_lines_is_refused_after_a_bounded_read(tmp_path, test_lines):
    bomb = tmp_path / "test.csv.gz"  # kilobytes that decompress to 64 MiB of blank lines
    bomb.write_bytes(gzip.compress(("\n".join(test_lines[:2]) + "\n").encode() + b"\n" * (64 << 20)))
    message = r"test.csv.gz: more than 1,048,576 blank lines; not a Kaggle digits CSV"
    with pytest.raises(DigitsError, match=message):
        count_csv_rows(str(bomb))
    with pytest.raises(DigitsError, match=message):
        list(read_csv_chunks(str(bomb), labelled=False))


def test_a_folder_or_glob_lists_its_files_in_name_order_and_skips_hidden_ones(tmp_path, test_lines):
    folder = tmp_path / "parts"
    (folder / "b").mkdir(parents=True)
    _write(folder / "a.csv", test_lines[:11])
    _write(folder / "b" / "c.csv", [test_lines[0], *test_lines[11:31]])
    _write(folder / "_SUCCESS.csv", test_lines[:3])
    _write(folder / ".hidden.csv", test_lines[:3])
    (folder / "notes.txt").write_text("not data")
    source = open_input(str(folder))
    assert source.kind == "csv" and not source.own_ids
    assert source.files == [f"{folder}/a.csv", f"{folder}/b/c.csv"]
    assert open_input(f"{folder}/b/*.csv").files == [f"{folder}/b/c.csv"]
    assert [inspect_file("csv", file)["rows"] for file in source.files] == [10, 20]
    # ImageIds run on from one file to the next: the report's in-process reader numbers them so
    found = read_images(source, np.array([10, 11, 30]))
    expected = read_test_csv(str(tmp_path / "parts" / "b" / "c.csv")).images
    assert np.array_equal(found[11], expected[0]) and np.array_equal(found[30], expected[19])


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "folder holds no .csv, .csv.gz, .parquet or .pq files"),
        (lambda d: (d / "x.txt").write_text("x"), "folder holds no .csv"),
        (
            lambda d: [(d / "a.csv").write_text("pixel0\n0\n"), (d / "b.parquet").write_bytes(b"PAR1")],
            "mixes CSV and Parquet files",
        ),
        (lambda d: (d / "a.parquet").write_bytes(b"not parquet"), "a.parquet: not readable as Parquet"),
        (lambda d: (d / "a.csv").write_text("label,pixel0\n1,0\n"), "a.csv: header: missing column"),
    ],
)
def test_unusable_folders_are_refused_before_anything_is_read(tmp_path, setup, message):
    folder = tmp_path / "input"
    folder.mkdir()
    setup(folder)
    with pytest.raises(DigitsError, match=message):
        open_input(str(folder))


def test_parquet_files_are_checked_row_by_row(tmp_path, kaggle_dir):
    frame = pd.DataFrame(
        read_test_csv(str(kaggle_dir / "test.csv"), limit=50).images.reshape(50, 784).astype(np.int64),
        columns=PIXEL_COLUMNS,
    )
    frame.loc[37, "pixel300"] = 256
    frame.to_parquet(tmp_path / "bad.parquet")
    source = open_input(str(tmp_path / "bad.parquet"))
    with pytest.raises(DigitsError, match=r"bad.parquet: row 38, column pixel300: 256 is outside 0-255"):
        list(read_file(source.kind, source.files[0], first_id=1))
    frame["ImageId"] = np.arange(50)  # 0 is not a valid ImageId
    frame.loc[37, "pixel300"] = 0
    frame.to_parquet(tmp_path / "ids.parquet")
    source = open_input(str(tmp_path / "ids.parquet"))
    assert source.own_ids
    with pytest.raises(DigitsError, match=r"ids.parquet: row 1, column ImageId: 0 is outside 1-"):
        list(read_file(source.kind, source.files[0], first_id=None))


def test_parquet_row_groups_larger_than_their_rows_can_be_are_refused_unread(tmp_path, kaggle_dir, monkeypatch):
    frame = pd.DataFrame(
        read_test_csv(str(kaggle_dir / "test.csv"), limit=50).images.reshape(50, 784), columns=PIXEL_COLUMNS
    )
    frame.to_parquet(tmp_path / "test.parquet")
    source = open_input(str(tmp_path / "test.parquet"))
    assert len(list(read_file(source.kind, source.files[0], first_id=1))) == 1
    # What a row group may take per row, cut to below what this real one takes: the footer alone
    # is enough to refuse it.
    monkeypatch.setattr(predict_input, "PARQUET_VALUE_BYTES", 0)
    monkeypatch.setattr(predict_input, "PARQUET_CHUNK_BYTES", 0)
    with pytest.raises(DigitsError, match=r"test.parquet: row group 1, column pixel0: [\d,]+ bytes for 50 rows"):
        next(read_file(source.kind, source.files[0], first_id=1))

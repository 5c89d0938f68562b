"""The bad-input corpus, fed to the real `digits` entry point (in-process, so the whole corpus
runs in seconds; subprocess runs in test_training/test_scoring check real exit codes).

Every case must give exactly one line, `digits: error: ...`, naming the problem and where,
exit status 2, no traceback, and nothing written."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from digit_models.cli import main

GOOD_ROWS = 40  # rows of the real train.csv / test.csv slices each case starts from


def _lines(path: Path, rows: int = GOOD_ROWS) -> list[str]:
    with open(path) as f:
        return [next(f).rstrip("\n") for _ in range(rows + 1)]


def _replace_cell(line: str, column: int, value: str) -> str:
    cells = line.split(",")
    cells[column] = value
    return ",".join(cells)


def _header_change(change):
    return lambda lines: [",".join(change(lines[0].split(",")))] + lines[1:]


def _cell(row: int, column: int, value: str):
    return lambda lines: lines[:row] + [_replace_cell(lines[row], column, value)] + lines[row + 1 :]


# (case id, transform of the text lines, the message after the file's name). Columns are
# indices into train.csv's cells; the test.csv version shifts them left by one, and its
# messages take the fields of TEST_CSV where train.csv's take TRAIN_CSV's (and `cut`, the
# columns of the cut last line).
CSV_CASES = [
    ("header-only", lambda lines: lines[:1], "no data rows after the header"),
    (
        "missing-column",
        _header_change(lambda h: h[:-1]),
        "header: missing column 'pixel783' (expected {first},...,pixel783)",
    ),
    (
        "extra-column",
        _header_change(lambda h: h + ["pixel784"]),
        "header: unexpected column 'pixel784' (expected {first},...,pixel783)",
    ),
    (
        "renamed-column",
        _header_change(lambda h: h[:5] + ["px4"] + h[6:]),
        "header: missing column 'pixel4'; unexpected column 'px4' (expected {first},...,pixel783)",
    ),
    (
        "reordered-columns",
        _header_change(lambda h: h[:3] + [h[4], h[3]] + h[5:]),
        "header: column {pixel2_at} is 'pixel3', expected 'pixel2' (columns out of order)",
    ),
    (
        "duplicated-column",
        _header_change(lambda h: h[:-1] + [h[-2]]),
        "header: column 'pixel782' appears more than once",
    ),
]
# Bad rows: train.csv's are found as the driver reads it, test.csv's by `digits predict`'s
# read tasks in Ray Data (read_file); a run of the whole pipeline with one of them is
# tests/test_scoring.py's.
ROW_CASES = [
    ("non-numeric", _cell(7, 300, "x7"), "row 7, column pixel299: 'x7' is not an integer pixel value 0-255"),
    ("float", _cell(3, 200, "3.5"), "row 3, column pixel199: '3.5' is not an integer pixel value 0-255"),
    ("negative", _cell(5, 100, "-4"), "row 5, column pixel99: '-4' is not an integer pixel value 0-255"),
    ("over-255", _cell(9, 400, "300"), "row 9, column pixel399: '300' is not an integer pixel value 0-255"),
    ("blank-cell", _cell(2, 50, ""), "row 2, column pixel49: blank cell"),
    (
        "truncated-last-line",
        lambda lines: lines[:-1] + [lines[-1][: len(lines[-1]) // 2]],
        f"row {GOOD_ROWS}: has {{cut}} columns, expected {{columns}}",
    ),
]
TRAIN_CSV = {"first": "label", "pixel2_at": 4, "columns": 785}
TEST_CSV = {"first": "pixel0", "pixel2_at": 3, "columns": 784}
LABEL_CASES = [
    ("label-10", _cell(4, 0, "10"), "row 4, column label: '10' is not a digit 0-9"),
    ("label-minus-1", _cell(6, 0, "-1"), "row 6, column label: '-1' is not a digit 0-9"),
]


def _as_test_csv(transform):
    """The same mutation on test.csv, whose cells sit one column to the left."""

    def apply(lines):
        return [",".join(line.split(",")[1:]) for line in transform(lines)]

    return apply


def _bad_test_csv(tmp_path: Path, kaggle_dir: Path, transform) -> tuple[Path, str]:
    """test.csv's slice with a case's mutation applied (tmp_path/test.csv), and the number of
    cells on its last line (the `cut` of a truncated line's message)."""
    lines = _lines(kaggle_dir / "test.csv")
    bad = tmp_path / "test.csv"
    bad.write_text("\n".join(_as_test_csv(transform)([f"label,{line}" for line in lines])) + "\n")
    return bad, str(len(bad.read_text().splitlines()[-1].split(",")))


def _only_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("digits: error: "), err
    return lines[0]


def _train(data: Path, out: Path) -> int:
    return main(["train", "--model", "dense", "--data", str(data), "--out", str(out), "--epochs", "1"])


@pytest.mark.parametrize(
    "case,transform,message", CSV_CASES + ROW_CASES + LABEL_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_train_rejects(tmp_path, capsys, kaggle_dir, case, transform, message):
    bad = tmp_path / "train.csv"
    bad.write_text("\n".join(transform(_lines(kaggle_dir / "train.csv"))) + "\n")
    assert _train(bad, tmp_path / "run") == 2
    cut = len(bad.read_text().splitlines()[-1].split(","))
    assert _only_error_line(capsys) == f"digits: error: {bad}: {message.format(**TRAIN_CSV, cut=cut)}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,transform,message", CSV_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_predict_rejects(tmp_path, capsys, kaggle_dir, dense_run, case, transform, message):
    bad, cut = _bad_test_csv(tmp_path, kaggle_dir, transform)
    out = tmp_path / "scored"
    assert main(["predict", "--run", str(dense_run), "--input", str(bad), "--out", str(out)]) == 2
    assert _only_error_line(capsys) == f"digits: error: {bad}: {message.format(**TEST_CSV, cut=cut)}"
    assert not out.exists()


@pytest.mark.parametrize("case,transform,message", ROW_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_predict_read_tasks_reject(tmp_path, kaggle_dir, case, transform, message):
    """What `digits predict`'s read tasks do with each file (predict_input.read_file), here
    in-process: each bad row is an error that names the file, row and column."""
    from digit_models.errors import DigitsError
    from digit_models.scoring.predict_input import read_file

    bad, cut = _bad_test_csv(tmp_path, kaggle_dir, transform)
    with pytest.raises(DigitsError) as refused:
        list(read_file("csv", str(bad), first_id=1))
    assert str(refused.value) == f"{bad}: {message.format(**TEST_CSV, cut=cut)}"


def test_accepted_variants_bom_crlf_and_gzip(tmp_path, capsys, kaggle_dir):
    lines = _lines(kaggle_dir / "train.csv", rows=200)
    variants = {
        "bom.csv": b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n",
        "crlf.csv": "\r\n".join(lines).encode() + b"\r\n",
        "packed.csv.gz": gzip.compress("\n".join(lines).encode() + b"\n"),
    }
    from digit_models.storage.kaggle_csv import read_train_csv

    reference = read_train_csv(str(kaggle_dir / "train.csv"), limit=200)
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
        read = read_train_csv(str(tmp_path / name))
        assert (read.images == reference.images).all() and (read.labels == reference.labels).all(), name


@pytest.mark.parametrize("case", ["empty", "corrupt-gz", "directory", "missing", "io-error"])
def test_unusable_files_are_rejected_by_train_and_predict(tmp_path, capsys, dense_run, case):
    if case == "empty":
        path = tmp_path / "data.csv"
        path.write_bytes(b"")
        message = "empty file, expected a CSV header"
    elif case == "corrupt-gz":
        path = tmp_path / "data.csv.gz"
        path.write_bytes(gzip.compress(b"label,pixel0\n" * 100)[:30] + b"\xff" * 64)
        message = "cannot read: Truncated compressed stream"
    elif case == "directory":  # train takes it for a data folder, predict for a Parquet folder
        path = tmp_path / "folder"
        path.mkdir()
        message = "folder"
    elif case == "missing":
        path = tmp_path / "absent.csv"
        message = "no such file"
    else:  # reading /proc/self/mem from its start fails with EIO: an unreadable file, even for root
        path = tmp_path / "unreadable.csv"
        os.symlink("/proc/self/mem", path)
        message = "cannot read: [Errno 5] Error reading bytes from file. Detail: [errno 5] Input/output error"
    assert _train(path, tmp_path / "run") == 2
    trained = _only_error_line(capsys)
    assert main(["predict", "--run", str(dense_run), "--input", str(path), "--out", str(tmp_path / "o")]) == 2
    predicted = _only_error_line(capsys)
    if case == "directory":
        assert (
            "folder has no train.csv" in trained and "folder holds no .csv, .csv.gz, .parquet or .pq files" in predicted
        )
    else:
        assert trained == predicted == f"digits: error: {path}: {message}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_train_data_folder_without_train_csv(tmp_path, capsys):
    assert _train(tmp_path, tmp_path / "run") == 2
    assert "folder has no train.csv" in _only_error_line(capsys)


def test_run_dirs_without_a_model_or_with_a_corrupt_one(tmp_path, capsys, kaggle_dir, dense_run):
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    (no_model / "run.json").write_text((dense_run / "run.json").read_text())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text("{}")
    (corrupt / "model.keras").write_bytes((dense_run / "model.keras").read_bytes()[:5000])
    for run, message in (
        (no_model, "no model.keras"),
        (corrupt, "not a loadable Keras model"),
        (tmp_path / "nowhere", "no such run directory"),
    ):
        code = main(
            ["predict", "--run", str(run), "--input", str(kaggle_dir / "test.csv"), "--out", str(tmp_path / "o")]
        )
        assert code == 2 and message in _only_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_model_file_that_would_run_code_is_refused(tmp_path, capsys, kaggle_dir):
    """Keras safe mode: a Lambda layer's bytecode is never deserialized."""
    import json

    import tf_keras as keras

    model = keras.Sequential(
        [keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Lambda(lambda x: x * 2.0), keras.layers.Dense(10)]
    )
    run = tmp_path / "lambda-run"
    run.mkdir()
    model.save(run / "model.keras", save_format="keras_v3")
    (run / "run.json").write_text(json.dumps({"model": "lambda"}))
    code = main(["predict", "--run", str(run), "--input", str(kaggle_dir / "test.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    line = _only_error_line(capsys)
    assert line.endswith(
        "model.keras: refused: the model contains Python code (e.g. a Lambda "
        "layer), which Keras safe mode does not load"
    )
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- evaluate


def _id_label_file(path: Path, rows) -> Path:
    path.write_text("ImageId,Label\n" + "".join(f"{i},{label}\n" for i, label in rows))
    return path


EVALUATE_CASES = [
    ("missing-id", [(1, 3), (2, 4)], "no prediction for ImageId 3"),
    ("duplicated-id", [(1, 3), (2, 4), (2, 4), (3, 5)], "row 3, column ImageId: 2 appears more than once"),
    ("unknown-id", [(1, 3), (2, 4), (3, 5), (4, 1)], "ImageId 4 is not in"),
    ("label-out-of-range", [(1, 3), (2, 12), (3, 5)], "row 2, column Label: '12' is not an integer 0-9"),
    ("non-numeric-id", [(1, 3), ("two", 4), (3, 5)], "row 2, column ImageId: 'two'"),
]


@pytest.mark.parametrize("case,predicted,message", EVALUATE_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_evaluate_rejects(tmp_path, capsys, case, predicted, message):
    labels = _id_label_file(tmp_path / "labels.csv", [(1, 3), (2, 4), (3, 5)])
    submission = _id_label_file(tmp_path / "submission.csv", predicted)
    assert main(["evaluate", "--predictions", str(submission), "--labels", str(labels)]) == 2
    assert message in _only_error_line(capsys)
    assert not (tmp_path / "evaluation.json").exists()


def test_evaluate_rejects_labels_of_a_different_test_set(tmp_path, capsys, kaggle_dir):
    submission = _id_label_file(tmp_path / "submission.csv", [(i, 1) for i in range(1, 28_001)])
    code = main(["evaluate", "--predictions", str(submission), "--labels", str(kaggle_dir / "test_labels.csv")])
    assert code == 2
    line = _only_error_line(capsys)
    assert "ImageId 1501 is not in" in line and "labels of a different test set?" in line
    assert not (tmp_path / "evaluation.json").exists()


def test_evaluate_refuses_an_incomplete_predictions_folder(tmp_path, capsys, kaggle_dir):
    (tmp_path / "scored" / "predictions").mkdir(parents=True)
    code = main(
        ["evaluate", "--predictions", str(tmp_path / "scored"), "--labels", str(kaggle_dir / "test_labels.csv")]
    )
    assert code == 2 and "not a complete `digits predict` output" in _only_error_line(capsys)


def test_evaluate_refuses_a_gzip_bomb_of_labels_unread(tmp_path, capsys):
    from digit_models.storage.submission_csv import SMALL_CSV_BYTES

    submission = _id_label_file(tmp_path / "submission.csv", [(1, 3)])
    bomb = tmp_path / "labels.csv.gz"  # about 64 KiB that decompress to more than 64 MiB
    bomb.write_bytes(gzip.compress(b"ImageId,Label\n1,3\n" + b"\n" * SMALL_CSV_BYTES))
    assert bomb.stat().st_size < 1 << 20
    assert main(["evaluate", "--predictions", str(submission), "--labels", str(bomb)]) == 2
    assert _only_error_line(capsys).endswith(
        "labels.csv.gz: more than 64 MiB decompressed; too large for a labels or submission file"
    )
    assert not (tmp_path / "evaluation.json").exists()


def test_data_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert main(["data", "--out", str(target)]) == 2
    assert "exists and is not a folder" in _only_error_line(capsys)
    assert target.read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "train", "--data", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(
        "digits: error: " + str(tmp_path / "absent.csv") + ": no such file"
    )


DATA_FOLDER_CASES = [
    (
        "a-kaggle-download",
        {"train.csv": "label,pixel0\n", "test.csv": "pixel0\n"},
        "not empty and not an earlier `digits data` output",
    ),
    (
        "ours-and-a-users-file",
        {"manifest.json": "ours", "notes.txt": "mine"},
        "holds 'notes.txt', which `digits data` does not write",
    ),
    (
        "a-manifest-of-another-tool",
        {"manifest.json": '{"files": {"train.csv": "x"}}', "train.csv": "mine"},
        "manifest.json: not written by `digits data`",
    ),
]


@pytest.mark.parametrize("case,files,message", DATA_FOLDER_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_data_refuses_a_folder_that_is_not_its_own_output(tmp_path, capsys, kaggle_dir, case, files, message):
    if files.get("manifest.json") == "ours":
        files = {**files, "manifest.json": (kaggle_dir / "manifest.json").read_text()}
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(content)
    assert main(["data", "--out", str(folder)]) == 2
    line = _only_error_line(capsys)
    assert message in line and line.endswith("or give --force to overwrite the files `digits data` writes")
    assert {path.name: path.read_text() for path in folder.iterdir()} == files
    assert not list(tmp_path.glob(".data.partial-*"))

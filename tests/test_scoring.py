"""Batch scoring on real Ray Data, and evaluation, on real MNIST slices."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from digit_models.config import PredictConfig
from digit_models.storage.kaggle_csv import PIXEL_COLUMNS, read_test_csv
from digit_models.errors import DigitsError
from digit_models.scoring.evaluation import evaluate
from digit_models.nets.models import load_model_file
from digit_models.scoring.predict import PROBABILITY_COLUMNS, predict
from tests.conftest import REPO, SLICE_TEST_ROWS, counted_correct, ray_processes, run_digits


def _in_process_probabilities(run_dir: Path, images: np.ndarray) -> np.ndarray:
    return load_model_file(str(run_dir / "model.keras")).predict(images, verbose=0)


def test_every_image_is_scored_once_and_matches_an_in_process_predict(dense_scored, kaggle_dir, dense_run):
    table = pq.read_table(dense_scored / "predictions")
    assert sorted(table.column("ImageId").to_pylist()) == list(range(1, SLICE_TEST_ROWS + 1))
    frame = table.to_pandas().sort_values("ImageId")
    test = read_test_csv(str(kaggle_dir / "test.csv"))
    expected = _in_process_probabilities(dense_run, test.images)
    assert np.array_equal(frame["Label"].to_numpy(), expected.argmax(axis=1))
    assert np.allclose(frame[PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-5)


def test_parquet_schema_is_the_documented_one(dense_scored):
    schema = pq.read_schema(next((dense_scored / "predictions").glob("*.parquet")))
    assert schema.names == ["ImageId", "Label", "Confidence", *PROBABILITY_COLUMNS]
    assert schema.field("ImageId").type == pa.int32() and schema.field("Label").type == pa.int32()
    assert all(schema.field(c).type == pa.float32() for c in ["Confidence", *PROBABILITY_COLUMNS])
    frame = pd.read_parquet(dense_scored / "predictions")  # pandas reads the folder too
    assert np.allclose(frame[PROBABILITY_COLUMNS].sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(frame["Confidence"], frame[PROBABILITY_COLUMNS].max(axis=1))


def test_submission_has_kaggles_exact_layout(dense_scored, kaggle_dir):
    submission = (dense_scored / "submission.csv").read_bytes().decode("ascii").split("\n")
    sample = (kaggle_dir / "sample_submission.csv").read_bytes().decode("ascii").split("\n")
    assert submission[0] == sample[0] == "ImageId,Label"
    assert len(submission) == len(sample) and submission[-1] == sample[-1] == ""  # trailing LF
    assert [line.split(",")[0] for line in submission[1:-1]] == [line.split(",")[0] for line in sample[1:-1]]
    assert all(line.split(",")[1] in "0123456789" and len(line.split(",")) == 2 for line in submission[1:-1])
    labels = pd.read_parquet(dense_scored / "predictions").sort_values("ImageId")["Label"].tolist()
    assert [int(line.split(",")[1]) for line in submission[1:-1]] == labels
    record = json.loads((dense_scored / "predict.json").read_text())
    assert record["images"] == SLICE_TEST_ROWS and record["actors"] == 2


def test_an_ensemble_averages_the_models_probabilities(tmp_path, kaggle_dir, dense_run, cnn_run, ray_local):
    out = tmp_path / "ensemble"
    predict(
        PredictConfig(
            runs=[str(dense_run), str(cnn_run)], input=str(kaggle_dir / "test.csv"), out=str(out), batch_size=256
        )
    )
    frame = pd.read_parquet(out / "predictions").sort_values("ImageId")
    images = read_test_csv(str(kaggle_dir / "test.csv")).images
    expected = (_in_process_probabilities(dense_run, images) + _in_process_probabilities(cnn_run, images)) / 2
    assert np.allclose(frame[PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-5)
    assert np.array_equal(frame["Label"].to_numpy(), expected.argmax(axis=1))


def test_parquet_input_keeps_its_own_image_ids(tmp_path, kaggle_dir, dense_run, ray_local):
    test = read_test_csv(str(kaggle_dir / "test.csv"), limit=300)
    ids = np.random.default_rng(0).permutation(np.arange(5001, 5301)).astype(np.int32)
    frame = pd.DataFrame(test.images.reshape(300, 784), columns=PIXEL_COLUMNS)
    frame.insert(0, "ImageId", ids)
    frame.to_parquet(tmp_path / "test.parquet")
    predict(PredictConfig(runs=[str(dense_run)], input=str(tmp_path / "test.parquet"), out=str(tmp_path / "out")))
    result = pd.read_parquet(tmp_path / "out" / "predictions").set_index("ImageId").loc[ids]
    expected = _in_process_probabilities(dense_run, test.images).argmax(axis=1)
    assert np.array_equal(result["Label"].to_numpy(), expected)
    assert (tmp_path / "out" / "submission.csv").read_text().splitlines()[1].startswith("5001,")


def test_several_files_and_blocks_keep_kaggles_row_numbers(tmp_path, kaggle_dir, dense_run, ray_local):
    """9,000 rows (the slice six times over) in three files, one gzip'd: Ray reads the first
    two in several blocks each, and every ImageId is the row's number across the files."""
    lines = (kaggle_dir / "test.csv").read_text().splitlines()
    rows = lines[1:] * 6
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-0.csv").write_text("\n".join([lines[0], *rows[:4000]]) + "\n")
    (parts / "part-1.csv").write_text("\n".join([lines[0], *rows[4000:7000]]) + "\n")
    (parts / "part-2.csv.gz").write_bytes(gzip.compress(("\n".join([lines[0], *rows[7000:]]) + "\n").encode()))
    record = predict(
        PredictConfig(
            runs=[str(dense_run)],
            input=str(parts),
            out=str(tmp_path / "out"),
            batch_size=512,
            actors=2,
            cpus_per_actor=1,
        )
    )
    assert record["images"] == 9000 and [f["rows"] for f in record["input_files"]] == [4000, 3000, 2000]
    frame = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("ImageId")
    assert frame["ImageId"].tolist() == list(range(1, 9001))
    images = read_test_csv(str(kaggle_dir / "test.csv")).images
    expected = _in_process_probabilities(dense_run, np.concatenate([images] * 6)).argmax(axis=1)
    assert np.array_equal(frame["Label"].to_numpy(), expected)
    submission = (tmp_path / "out" / "submission.csv").read_text().splitlines()
    assert submission[1:] == [f"{i},{label}" for i, label in zip(range(1, 9001), expected)]


def test_a_folder_of_parquet_files_is_numbered_across_files(tmp_path, kaggle_dir, dense_run, ray_local):
    test = read_test_csv(str(kaggle_dir / "test.csv"))
    folder = tmp_path / "parquet"
    folder.mkdir()
    for index, part in enumerate(np.array_split(np.arange(SLICE_TEST_ROWS), 3)):
        pd.DataFrame(test.images[part].reshape(len(part), 784), columns=PIXEL_COLUMNS).to_parquet(
            folder / f"part-{index}.parquet"
        )
    predict(PredictConfig(runs=[str(dense_run)], input=str(folder / "part-*.parquet"), out=str(tmp_path / "out")))
    frame = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("ImageId")
    assert frame["ImageId"].tolist() == list(range(1, SLICE_TEST_ROWS + 1))
    expected = _in_process_probabilities(dense_run, test.images).argmax(axis=1)
    assert np.array_equal(frame["Label"].to_numpy(), expected)


def test_a_bad_row_deep_in_a_large_input_is_named_and_nothing_is_written(
    tmp_path, kaggle_dir, dense_run, shared_ray_env
):
    lines = (kaggle_dir / "test.csv").read_text().splitlines()
    rows = lines[1:] * 8  # 12,000 rows: the bad one is in the read task's second chunk
    cells = rows[10_499].split(",")
    cells[123] = "-1"
    rows[10_499] = ",".join(cells)
    (tmp_path / "big.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    done = run_digits(
        "predict",
        "--run",
        str(dense_run),
        "--input",
        str(tmp_path / "big.csv"),
        "--out",
        str(tmp_path / "out"),
        env=shared_ray_env,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"digits: error: {tmp_path / 'big.csv'}: row 10500, column pixel123: '-1' is not an integer pixel value 0-255"
    ), done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big.csv"]


def test_a_gzip_of_blank_lines_is_refused_not_read_for_ever(tmp_path, kaggle_dir, dense_run, shared_ray_env):
    lines = (kaggle_dir / "test.csv").read_text().splitlines()
    bomb = tmp_path / "test.csv.gz"  # one image, then 64 MiB of blank lines in 64 KiB
    bomb.write_bytes(gzip.compress(("\n".join(lines[:2]) + "\n").encode() + b"\n" * (64 << 20)))
    done = run_digits(
        "predict", "--run", str(dense_run), "--input", str(bomb), "--out", str(tmp_path / "out"), env=shared_ray_env
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"digits: error: {bomb}: more than 1,048,576 blank lines; not a Kaggle digits CSV"
    ), done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test.csv.gz"]


def test_duplicated_own_image_ids_are_refused(tmp_path, kaggle_dir, dense_run, ray_local):
    test = read_test_csv(str(kaggle_dir / "test.csv"), limit=100)
    frame = pd.DataFrame(test.images.reshape(100, 784), columns=PIXEL_COLUMNS)
    frame.insert(0, "ImageId", np.r_[np.arange(1, 100), 42].astype(np.int32))
    frame.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(DigitsError, match="column ImageId: 42 appears more than once"):
        predict(PredictConfig(runs=[str(dense_run)], input=str(tmp_path / "dup.parquet"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_scoring_refuses_unfinished_or_broken_runs(tmp_path, kaggle_dir, dense_run):
    test_csv = str(kaggle_dir / "test.csv")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "model.keras").write_bytes((dense_run / "model.keras").read_bytes())
    with pytest.raises(DigitsError, match="no run.json, so not a finished run"):
        predict(PredictConfig(runs=[str(unfinished)], input=test_csv, out=str(tmp_path / "o")))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text("{}")
    (corrupt / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DigitsError, match="model.keras: not a loadable Keras model"):
        predict(PredictConfig(runs=[str(corrupt)], input=test_csv, out=str(tmp_path / "o")))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(DigitsError, match="not an earlier `digits predict` output"):
        predict(PredictConfig(runs=[str(dense_run)], input=test_csv, out=str(tmp_path / "precious")))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spelled", ["with a trailing slash", "relative", "through a link"])
def test_the_same_run_twice_in_an_ensemble_is_refused(tmp_path, kaggle_dir, dense_run, spelled):
    (tmp_path / "link").symlink_to(dense_run)
    again = {
        "with a trailing slash": f"{dense_run}/",
        "relative": os.path.relpath(dense_run, REPO),
        "through a link": str(tmp_path / "link"),
    }[spelled]
    done = run_digits(
        "predict",
        "--run",
        str(dense_run),
        "--run",
        again,
        "--input",
        str(kaggle_dir / "test.csv"),
        "--out",
        str(tmp_path / "scored"),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"digits: error: --run {again}: the same run as --run {dense_run}; give each member of an ensemble once"
    ]
    assert not (tmp_path / "scored").exists()


def test_predict_json_records_the_extra_views_asked_for_and_the_views_in_all(
    tmp_path, kaggle_dir, dense_run, shared_ray_env
):
    rows = (kaggle_dir / "test.csv").read_text().splitlines(keepends=True)[:65]  # 64 images: cheap
    (tmp_path / "test.csv").write_text("".join(rows))
    done = run_digits(
        "predict",
        "--run",
        str(dense_run),
        "--input",
        str(tmp_path / "test.csv"),
        "--out",
        str(tmp_path / "scored"),
        "--tta",
        "2",
        env=shared_ray_env,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "scored" / "predict.json").read_text())
    assert (record["tta_extra_views"], record["views_per_image"]) == (2, 3)
    assert "tta_views" not in record


# ---------------------------------------------------------------------------- evaluate


def _write_csv(path: Path, rows: list[tuple]) -> str:
    path.write_text("ImageId,Label\n" + "".join(f"{i},{label}\n" for i, label in rows))
    return str(path)


def test_evaluate_numbers_on_a_hand_checked_case(tmp_path):
    labels = _write_csv(tmp_path / "labels.csv", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 9)])
    predictions = _write_csv(tmp_path / "sub.csv", [(5, 9), (4, 1), (3, 2), (2, 1), (1, 0)])
    result = evaluate(predictions, labels)
    assert result["accuracy"] == 0.8 and result["correct"] == 4 and result["images"] == 5
    assert result["per_class"]["2"] == {"accuracy": 0.5, "images": 2}
    assert result["per_class"]["9"] == {"accuracy": 1.0, "images": 1}
    assert result["per_class"]["5"] == {"accuracy": 0.0, "images": 0}
    confusion = np.array(result["confusion_matrix"])
    assert confusion[2, 1] == 1 and confusion[2, 2] == 1 and confusion.sum() == 5
    assert "official_mnist_test" not in result


@pytest.mark.parametrize(
    "predicted,message",
    [
        ([(1, 0), (2, 1)], "no prediction for ImageId 3"),
        ([(1, 0), (2, 1), (3, 2), (3, 2)], "row 4, column ImageId: 3 appears more than once"),
        ([(1, 0), (2, 1), (3, 2), (7, 2)], "ImageId 7 is not in"),
    ],
)
def test_evaluate_refuses_mismatched_ids(tmp_path, predicted, message):
    labels = _write_csv(tmp_path / "labels.csv", [(1, 0), (2, 1), (3, 2)])
    with pytest.raises(DigitsError, match=message):
        evaluate(_write_csv(tmp_path / "sub.csv", predicted), labels)


def test_evaluate_refuses_a_predictions_folder_with_a_duplicated_id(tmp_path, dense_scored):
    broken = tmp_path / "broken"
    (broken / "predictions").mkdir(parents=True)
    table = pq.read_table(dense_scored / "predictions")
    (broken / "predict.json").write_text(json.dumps({"images": len(table) + 1}))
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), broken / "predictions" / "p.parquet")
    with pytest.raises(DigitsError, match="predictions: ImageId .* appears more than once"):
        evaluate(str(broken), str(tmp_path / "unused.csv"))


def test_evaluate_checks_the_predictions_footers_before_reading_them(tmp_path, dense_scored, kaggle_dir):
    labels = str(kaggle_dir / "test_labels.csv")
    more = tmp_path / "more"
    shutil.copytree(dense_scored, more)
    pq.write_table(pq.read_table(dense_scored / "predictions").slice(0, 10), more / "predictions" / "extra.parquet")
    with pytest.raises(DigitsError, match=r"more/predictions: 1,510 rows, but predict.json counts 1,500 images"):
        evaluate(str(more), labels)

    crafted = tmp_path / "crafted"
    (crafted / "predictions").mkdir(parents=True)
    (crafted / "predict.json").write_text(json.dumps({"images": 1}))
    # One row whose Label is 64 MiB of text, kilobytes on disk: refused from the footer alone.
    pq.write_table(
        pa.table({"ImageId": pa.array([1], pa.int32()), "Label": ["7" * (64 << 20)]}),
        crafted / "predictions" / "p.parquet",
        compression="zstd",
    )
    assert (crafted / "predictions" / "p.parquet").stat().st_size < 1 << 20
    with pytest.raises(
        DigitsError,
        match=r"crafted/predictions/p.parquet: row group 1, column Label: "
        r"67,1\d\d,\d\d\d bytes for 1 row, more than numbers take",
    ):
        evaluate(str(crafted), labels)


def test_evaluate_reports_the_official_mnist_test_subset(dense_scored, kaggle_dir):
    result = evaluate(str(dense_scored), str(kaggle_dir / "test_labels.csv"))
    official = result["official_mnist_test"]
    counted = counted_correct(dense_scored, kaggle_dir)
    assert (result["correct"], result["images"]) == counted["all"] and counted["all"][1] == 1_500
    assert (official["correct"], official["images"]) == counted["official"] and counted["official"][1] == 1_000
    assert official["accuracy"] == counted["official"][0] / 1_000
    assert 0.8 < result["accuracy"] < 1.0  # the dense net's 3 epochs on 2,000 rows: not every digit right


# ---------------------------------------------------------------------------- the CLI


def test_evaluate_from_the_command_line_with_origin_and_json_where_asked(tmp_path, dense_scored, kaggle_dir):
    """`digits evaluate` on a submission.csv, labels without test_origin.csv beside them: the
    official subset only with --origin, the numbers in the --json file asked for, and the
    accuracies those of the submission counted here."""
    labels = tmp_path / "labels" / "test_labels.csv"
    labels.parent.mkdir()
    shutil.copy(kaggle_dir / "test_labels.csv", labels)
    submission = dense_scored / "submission.csv"
    truth = pd.read_csv(labels).merge(pd.read_csv(submission), on="ImageId", suffixes=("", "_predicted"))
    right = truth["Label"] == truth["Label_predicted"]
    official = (
        pd.read_csv(kaggle_dir / "test_origin.csv").set_index("ImageId").loc[truth["ImageId"], "MnistSplit"] == "test"
    )

    plain = run_digits(
        "evaluate", "--predictions", str(submission), "--labels", str(labels), "--json", str(tmp_path / "plain.json")
    )
    with_origin = run_digits(
        "evaluate",
        "--predictions",
        str(submission),
        "--labels",
        str(labels),
        "--origin",
        str(kaggle_dir / "test_origin.csv"),
        "--json",
        str(tmp_path / "origin.json"),
    )
    assert plain.returncode == with_origin.returncode == 0, plain.stderr + with_origin.stderr
    assert plain.stdout.splitlines()[-1] == f"written to {tmp_path / 'plain.json'}"
    plain, with_origin = (json.loads((tmp_path / name).read_text()) for name in ("plain.json", "origin.json"))
    assert "official_mnist_test" not in plain and plain["accuracy"] == pytest.approx(right.mean())
    assert with_origin["official_mnist_test"]["images"] == official.sum() == 1000
    assert with_origin["official_mnist_test"]["accuracy"] == pytest.approx(right[official.to_numpy()].mean())


def test_a_killed_predict_leaves_nothing_and_the_cli_rerun_completes(
    tmp_path, kaggle_dir, dense_run, shared_ray_env, ray_tmpdir
):
    out, env = tmp_path / "out", {**shared_ray_env, "RAY_TMPDIR": ray_tmpdir}
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "digit_models.cli",
            "predict",
            "--run",
            str(dense_run),
            "--input",
            str(kaggle_dir / "test.csv"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "scoring never started"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists()
    again = run_digits(
        "predict", "--run", str(dense_run), "--input", str(kaggle_dir / "test.csv"), "--out", str(out), env=env
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"scored {SLICE_TEST_ROWS:,} images" in again.stdout and str(out / "submission.csv") in again.stdout
    assert len((out / "submission.csv").read_text().splitlines()) == SLICE_TEST_ROWS + 1
    assert not list(tmp_path.glob(".out.partial-*"))  # the abandoned attempt was cleaned up
    assert not ray_processes(ray_tmpdir)  # both joined the session's Ray; neither started one

    evaluated = run_digits("evaluate", "--predictions", str(out), "--labels", str(kaggle_dir / "test_labels.csv"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert evaluated.stdout.startswith("accuracy 0.")
    assert "official MNIST test images: accuracy" in evaluated.stdout
    assert json.loads((out / "evaluation.json").read_text())["images"] == SLICE_TEST_ROWS


@pytest.mark.parametrize("earlier", ["a-stray-record", "a-whole-output"])
def test_predict_refuses_a_folder_with_a_users_file_and_leaves_it_alone(
    tmp_path, kaggle_dir, dense_run, dense_scored, shared_ray_env, earlier
):
    out = tmp_path / "out"
    if earlier == "a-whole-output":
        shutil.copytree(dense_scored, out)
    else:
        out.mkdir()
        (out / "predict.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = sorted(path.name for path in out.iterdir())
    done = run_digits(
        "predict",
        "--run",
        str(dense_run),
        "--input",
        str(kaggle_dir / "test.csv"),
        "--out",
        str(out),
        env=shared_ray_env,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"digits: error: {out}: holds 'notes.txt', which `digits predict` does not write; refusing to replace it"
    ), done.stderr
    assert (out / "notes.txt").read_text() == "mine" and sorted(path.name for path in out.iterdir()) == before


def test_an_earlier_output_is_replaced_entry_by_entry(tmp_path, kaggle_dir, dense_run, dense_scored, shared_ray_env):
    out = tmp_path / "out"
    shutil.copytree(dense_scored, out)
    (out / "evaluation.json").write_text("{}")  # `digits evaluate`'s, of the predictions replaced
    folder = out.stat().st_ino
    lines = (kaggle_dir / "test.csv").read_text().splitlines()
    (tmp_path / "small.csv").write_text("\n".join(lines[:101]) + "\n")
    done = run_digits(
        "predict",
        "--run",
        str(dense_run),
        "--input",
        str(tmp_path / "small.csv"),
        "--out",
        str(out),
        env=shared_ray_env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.stat().st_ino == folder  # the folder stays where it is; only our entries are new
    assert sorted(path.name for path in out.iterdir()) == ["predict.json", "predictions", "submission.csv"]
    assert json.loads((out / "predict.json").read_text())["images"] == 100
    assert len((out / "submission.csv").read_text().splitlines()) == 101
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "small.csv"]  # nothing left beside it


def test_the_recorded_peak_memory_is_the_command_s_own_not_its_parent_s():
    """predict.json's driver_peak_rss_mb (runtime/process_memory.py). Linux carries getrusage's
    peak over an exec from the process that started the command: started by a large process (a
    notebook's kernel, the benchmark harness), a command reported its parent's size."""
    held = np.ones(600 << 17)  # 600 MB, every page touched
    measure = (
        "import resource; from digit_models.runtime.process_memory import peak_rss_mb; "
        "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    child = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True, check=True)
    own, carried_over = map(float, child.stdout.split())
    assert carried_over > 600 and own < 200, (own, carried_over)
    del held

"""The report: figures and a self-contained HTML page from a real training run and real
predictions on the real MNIST slice."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from digit_models.storage.kaggle_csv import read_test_csv
from digit_models.errors import DigitsError
from digit_models.scoring.report import Mistakes, confident_mistakes, mistakes_gallery, training_curves, write_report
from tests.conftest import counted_correct

FIGURES = ["training_curves.png", "confusion_matrix.png", "per_class_accuracy.png", "mistakes.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_picture(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 300


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_a_report_on_predictions_writes_every_figure_and_a_self_contained_page(
    tmp_path, dense_run, dense_scored, kaggle_dir
):
    labels = kaggle_dir / "test_labels.csv"
    out = tmp_path / "report"
    written = write_report(str(dense_run), str(out), predictions=str(dense_scored), labels=str(labels))

    assert written == [*FIGURES, "index.html"]
    assert sorted(path.name for path in out.iterdir()) == sorted(written)
    assert [path.name for path in tmp_path.iterdir()] == ["report"]  # no staging left behind
    for name in FIGURES:
        _assert_picture(out / name)
    page = (out / "index.html").read_text()
    assert _embedded_pngs(page) == [(out / name).read_bytes() for name in FIGURES]
    counted = counted_correct(dense_scored, kaggle_dir)  # test_origin.csv lies beside the labels
    for correct, images in (counted["all"], counted["official"]):
        assert f"{correct / images:.2%} ({correct:,} / {images:,})" in page


def test_the_gallery_holds_the_surest_wrong_predictions_with_the_images_scored(dense_scored, kaggle_dir):
    labels = pd.read_csv(kaggle_dir / "test_labels.csv")
    predicted = pd.read_parquet(dense_scored / "predictions")
    joined = predicted.merge(labels, on="ImageId", suffixes=("", "_true"))
    wrong = joined[joined["Label"] != joined["Label_true"]].sort_values("Confidence", ascending=False)

    mistakes = confident_mistakes(str(dense_scored), str(kaggle_dir / "test_labels.csv"), limit=5)

    assert mistakes.total == len(wrong) > 5  # a 3-epoch dense net on 2,000 rows errs
    assert np.allclose(mistakes.confidence, wrong["Confidence"].to_numpy()[:5])
    by_id = joined.set_index("ImageId")
    assert list(mistakes.truth) == by_id.loc[mistakes.image_ids, "Label_true"].tolist()
    assert list(mistakes.predicted) == by_id.loc[mistakes.image_ids, "Label"].tolist()
    test = read_test_csv(str(kaggle_dir / "test.csv"))  # ImageId k is row k
    assert np.array_equal(mistakes.images, test.images[mistakes.image_ids - 1])


def test_perfect_predictions_get_a_gallery_that_says_so(tmp_path, dense_run, dense_scored):
    as_labels = dense_scored / "submission.csv"  # the predictions graded against themselves
    assert confident_mistakes(str(dense_scored), str(as_labels)).total == 0
    out = tmp_path / "report"
    assert write_report(str(dense_run), str(out), str(dense_scored), str(as_labels)) == [*FIGURES, "index.html"]
    _assert_picture(out / "mistakes.png")
    assert "100.00% (1,500 / 1,500)" in (out / "index.html").read_text()


def test_a_report_on_a_run_alone_has_the_curves_and_the_page(tmp_path, dense_run):
    out = tmp_path / "report"
    assert write_report(str(dense_run), str(out)) == ["training_curves.png", "index.html"]
    assert sorted(path.name for path in out.iterdir()) == ["index.html", "training_curves.png"]
    _assert_picture(out / "training_curves.png")
    page = (out / "index.html").read_text()
    assert _embedded_pngs(page) == [(out / "training_curves.png").read_bytes()]
    assert "<td>dense</td>" in page and "<td>3 of 3</td>" in page and "Evaluation" not in page


def test_the_error_rate_axis_labels_every_tick_as_a_percentage():
    # Errors from 4% to 1%: within one decade, where matplotlib labels the minor ticks itself.
    history = [
        {"epoch": epoch, "loss": 0.1, "accuracy": accuracy, "val_accuracy": accuracy + 0.002}
        for epoch, accuracy in enumerate([0.96, 0.975, 0.985, 0.99], start=1)
    ]
    figure = training_curves({"model": "cnn", "history": history})
    figure.draw_without_rendering()
    error_axes = figure.axes[1]
    labels = [label.get_text() for label in error_axes.yaxis.get_ticklabels(which="both") if label.get_text()]
    assert len(labels) >= 3, labels
    assert all(re.fullmatch(r"\d+(\.\d+)?%", label) for label in labels), labels


def test_each_mistake_shows_a_confidence_that_tells_it_from_the_others():
    confidence = np.array([0.999991, 0.99987, 0.9987, 0.62], np.float32)
    mistakes = Mistakes(
        total=4,
        image_ids=np.arange(1, 5),
        truth=np.array([4, 7, 1, 3]),
        predicted=np.array([9, 1, 7, 5]),
        confidence=confidence,
        images=np.zeros((4, 28, 28), np.uint8),
    )
    captions = [axes.get_title() for axes in mistakes_gallery(mistakes).axes if axes.get_title()]
    shown = [re.search(r"\((\d\.\d+)\)", caption).group(1) for caption in captions]
    assert shown == ["0.999991", "0.99987", "0.9987", "0.62"], captions


def test_the_page_shows_the_training_settings_and_what_the_predictions_average(
    tmp_path, dense_run, dense_scored, kaggle_dir
):
    run = json.loads((dense_run / "run.json").read_text())
    config = run["config"]
    write_report(str(dense_run), str(tmp_path / "report"), str(dense_scored), str(kaggle_dir / "test_labels.csv"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"<th>batch</th><td>{config['batch_size']} per worker, {run['global_batch_size']} per update</td>" in page
    assert f"<th>learning rate</th><td>{config['learning_rate']:g}" in page
    assert f"<th>seed</th><td>{config['seed']}</td>" in page
    assert f"<th>model</th><td>{dense_run}</td>" in page  # the run that scored, not the one reported on
    assert "<th>test-time augmentation</th><td>none</td>" in page
    # An ensemble of two with --tta 8, as predict.json records it.
    shutil.copytree(dense_scored, tmp_path / "scored")
    record = json.loads((tmp_path / "scored" / "predict.json").read_text())
    record.update(runs=[str(dense_run), "/runs/other"], tta_extra_views=8, views_per_image=9)
    (tmp_path / "scored" / "predict.json").write_text(json.dumps(record))
    write_report(
        str(dense_run), str(tmp_path / "ensemble"), str(tmp_path / "scored"), str(kaggle_dir / "test_labels.csv")
    )
    page = (tmp_path / "ensemble" / "index.html").read_text()
    assert f"<th>ensemble of 2</th><td>{dense_run}, /runs/other</td>" in page
    assert "<th>test-time augmentation</th><td>8 extra views per image (9 averaged)</td>" in page


def test_strings_from_run_json_are_escaped(tmp_path, dense_run):
    run = json.loads((dense_run / "run.json").read_text())
    run["config"]["preset"] = "<script>alert(1)</script>"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    write_report(str(tmp_path / "run"), str(tmp_path / "report"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page


def _broken_run(tmp_path: Path, dense_run: Path, case: str) -> Path:
    run = tmp_path / "run"
    if case == "no run dir":
        return run
    run.mkdir()
    if case == "run.json not JSON":
        (run / "run.json").write_text('{"model": "dense", "histo')
    if case == "run.json without history":
        (run / "run.json").write_text('{"model": "dense", "history": []}')
    if case == "unfinished run":
        shutil.copy(dense_run / "model.keras", run)
    return run


@pytest.mark.parametrize("case", ["no run dir", "unfinished run", "run.json not JSON", "run.json without history"])
def test_an_unusable_run_is_refused_and_nothing_is_written(tmp_path, dense_run, case):
    run = _broken_run(tmp_path, dense_run, case)
    with pytest.raises(DigitsError, match=re.escape(str(run))) as raised:
        write_report(str(run), str(tmp_path / "report"))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "report").exists()
    assert not list(tmp_path.glob(".report*"))


@pytest.mark.parametrize("given", ["predictions", "labels"])
def test_predictions_and_labels_go_together(tmp_path, dense_run, dense_scored, kaggle_dir, given):
    paths = {"predictions": str(dense_scored), "labels": str(kaggle_dir / "test_labels.csv")}
    with pytest.raises(DigitsError, match="both"):
        write_report(str(dense_run), str(tmp_path / "report"), **{given: paths[given]})
    assert not (tmp_path / "report").exists()


def test_a_submission_csv_has_no_images_to_show(tmp_path, dense_run, dense_scored, kaggle_dir):
    with pytest.raises(DigitsError, match="not a `digits predict` output folder"):
        write_report(
            str(dense_run),
            str(tmp_path / "report"),
            str(dense_scored / "submission.csv"),
            str(kaggle_dir / "test_labels.csv"),
        )
    assert not (tmp_path / "report").exists()


def test_images_changed_since_scoring_are_refused(tmp_path, dense_run, dense_scored, kaggle_dir):
    # Another test.csv under the scored one's name: the gallery would show the wrong digits.
    shutil.copytree(dense_scored, tmp_path / "scored")
    lines = (kaggle_dir / "test.csv").read_text().splitlines(keepends=True)
    (tmp_path / "test.csv").write_text("".join([lines[0], *reversed(lines[1:])]))
    record = json.loads((tmp_path / "scored" / "predict.json").read_text())
    (tmp_path / "scored" / "predict.json").write_text(json.dumps({**record, "input": str(tmp_path / "test.csv")}))
    with pytest.raises(DigitsError, match="changed since it was scored"):
        write_report(
            str(dense_run), str(tmp_path / "report"), str(tmp_path / "scored"), str(kaggle_dir / "test_labels.csv")
        )
    assert not (tmp_path / "report").exists()


def test_a_folder_that_is_not_empty_is_left_alone(tmp_path, dense_run):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.txt").write_text("mine")
    with pytest.raises(DigitsError, match="not empty"):
        write_report(str(dense_run), str(tmp_path / "report"))
    assert [path.name for path in (tmp_path / "report").iterdir()] == ["notes.txt"]
    (tmp_path / "report" / "notes.txt").unlink()
    assert write_report(str(dense_run), str(tmp_path / "report"))  # an empty folder is fine

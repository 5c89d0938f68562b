"""`digits export`: each format, loaded the way a server loads it, predicts real test images as
model.keras does; bad input is one line, exit 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from digit_models.storage.kaggle_csv import read_test_csv
from tests.conftest import run_digits

IMAGES = 200


@pytest.fixture(scope="module")
def images_and_keras_predictions(cnn_run, kaggle_dir) -> tuple[np.ndarray, np.ndarray]:
    """model.keras's predictions as `digits predict` makes them: computing in float32, whatever
    precision the run trained in (bfloat16 where `--precision auto` picks it)."""
    from digit_models.nets.models import load_model_file

    images = read_test_csv(str(kaggle_dir / "test.csv")).images[:IMAGES].astype(np.float32)
    return images, load_model_file(str(cnn_run / "model.keras")).predict(images, verbose=0)


def _export(run: Path, out: Path, format: str) -> None:
    done = run_digits("export", "--run", str(run), "--format", format, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("wrote ")


def test_savedmodel_serves_what_model_keras_predicts(tmp_path, cnn_run, images_and_keras_predictions):
    import tensorflow as tf

    images, expected = images_and_keras_predictions
    _export(cnn_run, tmp_path / "digits", "savedmodel")
    assert (tmp_path / "digits" / "1" / "saved_model.pb").is_file()  # TF Serving's base/version
    serve = tf.saved_model.load(str(tmp_path / "digits" / "1")).signatures["serving_default"]
    [pixels] = serve.structured_input_signature[1].values()
    assert pixels.shape.as_list() == [None, 28, 28] and pixels.dtype == tf.float32
    probabilities = serve(pixels=tf.constant(images))["probabilities"].numpy()
    assert probabilities.shape == (IMAGES, 10)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


def test_tflite_predicts_what_model_keras_predicts(tmp_path, cnn_run, images_and_keras_predictions):
    import tensorflow as tf

    images, expected = images_and_keras_predictions
    _export(cnn_run, tmp_path / "lite", "tflite")
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "lite" / "model.tflite"))
    [given], [returned] = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(given["index"], [IMAGES, 28, 28])
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], images)
    interpreter.invoke()
    probabilities = interpreter.get_tensor(returned["index"])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


def _unfinished_run(tmp_path: Path) -> Path:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "started.json").write_text(json.dumps({"config": {}}))
    return run


def _occupied_out(tmp_path: Path) -> Path:
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return out


# (case, run (None: the trained one), --format, --out (None: a new folder), message)
BAD = [
    ("no-such-run", lambda tmp: tmp / "missing", "savedmodel", None, "no such run directory"),
    ("unfinished-run", _unfinished_run, "savedmodel", None, "no run.json, so not a finished run"),
    ("unknown-format", None, "onnx", None, "--format onnx: choose one of savedmodel, tflite"),
    ("out-not-empty", None, "tflite", _occupied_out, "not empty; choose another --out"),
]


@pytest.mark.parametrize("case, make_run, format, make_out, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cnn_run, case, make_run, format, make_out, message):
    run = make_run(tmp_path) if make_run else cnn_run
    out = make_out(tmp_path) if make_out else tmp_path / "export"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = run_digits("export", "--run", str(run), "--format", format, "--out", str(out))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("digits: error: ") and message in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

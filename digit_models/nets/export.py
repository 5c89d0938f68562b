"""`digits export`: a finished run's model in the formats servers load.

    savedmodel   OUT/1/, a TensorFlow SavedModel: OUT is a model base path TensorFlow Serving
                 watches, 1 its version. Signature `serving_default`: `pixels`, float32
                 [N, 28, 28] of 0-255 values (what Kaggle's CSV rows hold, and what TF
                 Serving's JSON API sends as plain numbers), to `probabilities`, float32 [N, 10].
    tflite       OUT/model.tflite, the same function converted by TensorFlow's TFLite converter.

The model scales its own pixels (its first layer), so the exported function is the model.
The run and --out are checked before TensorFlow loads, so that bad input fails in a moment;
the output folder is assembled beside --out and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from digit_models.config import EXPORT_FORMATS
from digit_models.errors import DigitsError, first_line
from digit_models.storage.files import Folder, is_uri, require_output_folder, staged_dir
from digit_models.nets.model_file import check_keras_archive
from digit_models.storage.run_dir import RunDir

VERSION = "1"  # TensorFlow Serving loads the highest numbered folder below the model base path
TFLITE_FILE = "model.tflite"
SIGNATURE = "serving_default"


def export(run: str, out: str, format: str) -> str:
    """Writes the run's model to `out` in `format`; returns what it wrote."""
    if format not in EXPORT_FORMATS:
        raise DigitsError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    if is_uri(out):
        raise DigitsError(f"--out {out}: must be a local folder (copy it to object storage after)")
    target = Path(out).resolve()
    require_output_folder(Folder(str(target)), "choose another --out")
    run_dir = RunDir(run)
    model = _load(run_dir)
    with staged_dir(target) as staging:
        if format == "savedmodel":
            write_savedmodel(model, staging / VERSION)
        else:
            (staging / TFLITE_FILE).write_bytes(tflite_model(model))
    return str(target / (VERSION if format == "savedmodel" else TFLITE_FILE))


def _load(run_dir: RunDir):
    content = run_dir.model_bytes()  # a finished run, and a Keras archive: before TensorFlow loads
    check_keras_archive(content, run_dir.child(RunDir.MODEL))  # and one of our models, still before
    from digit_models.nets.models import load_model_file

    with tempfile.TemporaryDirectory(prefix="digits-export-") as local:
        path = Path(local, RunDir.MODEL)
        path.write_bytes(content)
        return load_model_file(str(path), name=run_dir.child(RunDir.MODEL))


def serving_module(model):
    """The model behind one float32 [N, 28, 28] -> [N, 10] function, in a module that tracks
    the model's variables (what a SavedModel stores)."""
    from digit_models.runtime.tf_setup import tf

    module = tf.Module()
    module.model = model
    module.serve = tf.function(
        lambda pixels: {"probabilities": model(pixels, training=False)},
        input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name="pixels")],
    )
    return module


def write_savedmodel(model, path: Path) -> None:
    from digit_models.runtime.tf_setup import tf

    module = serving_module(model)
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: module.serve})


def tflite_model(model) -> bytes:
    from digit_models.runtime.tf_setup import tf

    module = serving_module(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    try:
        return converter.convert()
    except Exception as exc:  # noqa: BLE001  (the converter raises many types)
        raise DigitsError(f"--format tflite: TensorFlow's converter failed: {first_line(exc)}") from None

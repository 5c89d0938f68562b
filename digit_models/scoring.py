"""Batch scoring on Ray Data: test set -> per-actor model -> Parquet predictions + submission.csv.

The driver reads and validates the test set, then the rows go through a Ray Data pipeline:
`map_batches` with a callable class, so each scoring actor loads the model(s) once and
predicts whole batches, then `write_parquet`. Ray Data does not keep row order across parallel
blocks, so every row carries its ImageId through the pipeline.

Several runs form an ensemble: each actor averages the models' class probabilities.

The output folder is written beside its final place and renamed into it when complete, so an
interrupted run never leaves a predictions folder or a submission.csv that looks finished.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digit_models.config import ScoreConfig
from digit_models.data import file_sha256, is_directory, read_test_set
from digit_models.errors import DigitsError
from digit_models.files import staged_dir
from digit_models.ray_runtime import images_dataset, ray_session
from digit_models.layout import (MODEL_FILE, PREDICTIONS_DIR, RUN_FILE, SCORING_FILE,
                                 SUBMISSION_FILE)

PROBABILITY_COLUMNS = [f"prob_{digit}" for digit in range(10)]
PREDICTION_SCHEMA = pa.schema([("ImageId", pa.int32()), ("Label", pa.int32()),
                               ("Confidence", pa.float32()),
                               *[(column, pa.float32()) for column in PROBABILITY_COLUMNS]])


def predict(config: ScoreConfig, address: str | None = None) -> dict:
    """Scores config.input with the runs' models and writes OUT/predictions/, OUT/submission.csv
    and OUT/scoring.json (the completion record). Returns scoring.json's content."""
    config.validate()
    started = time.time()
    out_dir = Path(config.out).resolve()
    _require_replaceable(out_dir)
    model_files = [_finished_model_bytes(Path(run)) for run in config.runs]
    test = read_test_set(config.input)

    with ray_session(address), staged_dir(out_dir) as staging:
        import ray.data

        cpus = config.cpus_per_actor or max(1, int(ray.cluster_resources().get("CPU", 1)) // config.actors)
        dataset = images_dataset(test.images, num_blocks=4 * config.actors, ImageId=test.image_ids)
        predictions = dataset.map_batches(
            DigitPredictor, fn_constructor_kwargs={"model_files": model_files, "cpus": cpus},
            batch_size=config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=cpus, num_gpus=config.gpus_per_actor or None)
        scoring_started = time.time()
        # Writing is light; at zero CPUs it never waits for the actors to free theirs.
        predictions.write_parquet(str(staging / PREDICTIONS_DIR), min_rows_per_file=50_000,
                                  ray_remote_args={"num_cpus": 0})
        scoring_s = time.time() - scoring_started
        table = pq.read_table(staging / PREDICTIONS_DIR, schema=PREDICTION_SCHEMA)
        _require_every_image_once(table, test.image_ids, config.input)
        write_submission(table, staging / SUBMISSION_FILE)
        summary = {
            "runs": [str(Path(run).resolve()) for run in config.runs],
            "input": str(config.input),
            "input_sha256": None if is_directory(config.input) else file_sha256(config.input),
            "images": len(test),
            "actors": config.actors,
            "cpus_per_actor": cpus,
            "batch_size": config.batch_size,
            "scoring_s": round(scoring_s, 3),
            "images_per_s": round(len(test) / scoring_s, 1),
            "wall_s": round(time.time() - started, 3),
            "predictions": PREDICTIONS_DIR,
            "submission": SUBMISSION_FILE,
        }
        (staging / SCORING_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class DigitPredictor:
    """One per scoring actor: loads the models once, then predicts whole batches."""

    def __init__(self, model_files: list[bytes], cpus: int):
        import tensorflow as tf

        from digit_models.models import load_model_file

        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
        self.models = []
        with tempfile.TemporaryDirectory(prefix="digits-model-") as directory:
            for index, content in enumerate(model_files):
                path = os.path.join(directory, f"{index}.keras")
                Path(path).write_bytes(content)
                self.models.append(load_model_file(path))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probabilities = np.mean([model.predict_on_batch(batch["image"]) for model in self.models],
                                axis=0, dtype=np.float32)
        return {
            "ImageId": batch["ImageId"].astype(np.int32),
            "Label": probabilities.argmax(axis=1).astype(np.int32),
            "Confidence": probabilities.max(axis=1),
            **{column: probabilities[:, digit] for digit, column in enumerate(PROBABILITY_COLUMNS)},
        }


def write_submission(predictions: pa.Table, path: Path) -> None:
    """Kaggle's format exactly: `ImageId,Label`, one row per image, ImageId ascending."""
    order = np.argsort(predictions.column("ImageId").to_numpy())
    ids = predictions.column("ImageId").to_numpy()[order]
    labels = predictions.column("Label").to_numpy()[order]
    lines = ["ImageId,Label", *(f"{i},{label}" for i, label in zip(ids.tolist(), labels.tolist()))]
    path.write_text("\n".join(lines) + "\n")


def _require_every_image_once(predictions: pa.Table, image_ids: np.ndarray, source: str) -> None:
    got = np.sort(predictions.column("ImageId").to_numpy())
    if not np.array_equal(got, np.sort(image_ids)):
        raise DigitsError(f"{source}: the pipeline returned {len(got)} predictions for "
                          f"{len(image_ids)} images; not writing a partial submission")


def _require_replaceable(out_dir: Path) -> None:
    """The output folder may be new, empty, or an earlier `digits predict` output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DigitsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SCORING_FILE).exists():
        raise DigitsError(f"{out_dir}: not empty and not an earlier `digits predict` output; "
                          "refusing to replace it")


def _finished_model_bytes(run_dir: Path) -> bytes:
    """The run's model file, checked to load (safe mode) before any scoring starts. Bytes, so
    that actors on any node receive it through Ray rather than reading the driver's disk."""
    from digit_models.models import load_model_file

    if not run_dir.is_dir():
        raise DigitsError(f"{run_dir}: no such run directory")
    if not (run_dir / RUN_FILE).exists():
        raise DigitsError(f"{run_dir}: no {RUN_FILE}, so not a finished run")
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise DigitsError(f"{run_dir}: no {MODEL_FILE}")
    load_model_file(str(model_path))
    return model_path.read_bytes()

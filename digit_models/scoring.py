"""Batch scoring on Ray Data: test set -> per-actor model -> Parquet predictions + submission.csv.

The driver reads and validates the test set, then the rows go through a Ray Data pipeline:
`map_batches` with a callable class, so each scoring actor loads the model(s) once and
predicts whole batches, then `write_parquet`. Ray Data does not keep row order across parallel
blocks, so every row carries its ImageId through the pipeline.

Several runs form an ensemble: each actor averages the models' class probabilities, and with
test-time augmentation also over fixed shifted, rotated and zoomed views of each image.

The output folder is written beside its final place and renamed into it when complete, so an
interrupted run never leaves a predictions folder or a submission.csv that looks finished.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digit_models.config import ScoreConfig
from digit_models.data import file_sha256, is_directory, read_test_set
from digit_models.errors import DigitsError
from digit_models.files import Folder, is_uri, staged_dir
from digit_models.ray_runtime import cpus_per_process, images_dataset, ray_session
from digit_models.layout import (MODEL_FILE, PREDICTIONS_DIR, RUN_FILE, SCORING_FILE,
                                 SCORING_UNDERWAY, SUBMISSION_FILE)

PROBABILITY_COLUMNS = [f"prob_{digit}" for digit in range(10)]
PREDICTION_SCHEMA = pa.schema([("ImageId", pa.int32()), ("Label", pa.int32()),
                               ("Confidence", pa.float32()),
                               *[(column, pa.float32()) for column in PROBABILITY_COLUMNS]])


def predict(config: ScoreConfig, address: str | None = None) -> dict:
    """Scores config.input with the runs' models and writes OUT/predictions/, OUT/submission.csv
    and OUT/scoring.json (the completion record). Returns scoring.json's content."""
    config.validate()
    started = time.time()
    out = Folder(config.out if is_uri(config.out) else str(Path(config.out).resolve()))
    _require_replaceable(out)
    model_files = [_finished_model_bytes(run) for run in config.runs]
    test = read_test_set(config.input)

    with ray_session(address), _writing_into(out) as target:
        import ray.data

        cpus = config.cpus_per_actor or cpus_per_process(config.actors)
        dataset = images_dataset(test.images, num_blocks=4 * config.actors, ImageId=test.image_ids)
        predictions = dataset.map_batches(
            DigitPredictor,
            fn_constructor_kwargs={"model_files": model_files, "cpus": cpus, "tta": config.tta},
            batch_size=config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.actors), **actor_resources(config, cpus))
        scoring_started = time.time()
        # A local folder is written by tasks on this (the driver's) node: `local://`; a URI
        # by whichever node runs the task. Writing is light: at zero CPUs it never waits
        # for the actors to free theirs.
        parquet = target.child(PREDICTIONS_DIR)
        predictions.write_parquet(f"local://{parquet}" if target.is_local else parquet,
                                  min_rows_per_file=50_000, ray_remote_args={"num_cpus": 0})
        scoring_s = time.time() - scoring_started
        table = pq.read_table(f"{target.path}/{PREDICTIONS_DIR}", filesystem=target.fs,
                              schema=PREDICTION_SCHEMA)
        _require_every_image_once(table, test.image_ids, config.input)
        target.write_text(SUBMISSION_FILE, submission_csv(table))
        summary = {
            "runs": [str(run) for run in config.runs],
            # Absolute, so that readers elsewhere (`digits report`) find the images again.
            "input": config.input if is_uri(config.input) else str(Path(config.input).resolve()),
            "input_sha256": None if is_directory(config.input) else file_sha256(config.input),
            "images": len(test),
            "actors": config.actors,
            "cpus_per_actor": cpus,
            "batch_size": config.batch_size,
            "tta_views": 1 + config.tta,
            "scoring_s": round(scoring_s, 3),
            "images_per_s": round(len(test) / scoring_s, 1),
            "wall_s": round(time.time() - started, 3),
            "predictions": PREDICTIONS_DIR,
            "submission": SUBMISSION_FILE,
        }
        target.write_text(SCORING_FILE, json.dumps(summary, indent=2) + "\n")  # last
    return summary


@contextmanager
def _writing_into(out: Folder):
    """The folder to write the output into. Locally: a hidden staging folder renamed to `out`
    once complete. Remotely (object stores cannot rename): `out` itself, marked as underway
    and cleared of the previous output (completion record first), so that only a finished
    run has a completion record, and an interrupted one can be overwritten by the next."""
    if out.is_local:
        with staged_dir(Path(out.path)) as staging:
            yield Folder(str(staging))
        return
    out.create()
    out.write_text(SCORING_UNDERWAY, "")
    for name in (SCORING_FILE, SUBMISSION_FILE, PREDICTIONS_DIR):
        out.delete(name)
    yield out
    out.delete(SCORING_UNDERWAY)


def actor_resources(config: ScoreConfig, cpus: int) -> dict:
    """What each scoring actor asks Ray for; a GPU only when asked for."""
    return {"num_cpus": cpus, **({"num_gpus": config.gpus_per_actor} if config.gpus_per_actor else {})}


class DigitPredictor:
    """One per scoring actor: loads the models once, then predicts whole batches."""

    def __init__(self, model_files: list[bytes], cpus: int, tta: int = 0):
        from digit_models.models import load_model_file
        from digit_models.tf_setup import configure_tensorflow

        configure_tensorflow(cpus)
        self.views = 1 + tta
        self.models = []
        with tempfile.TemporaryDirectory(prefix="digits-model-") as directory:
            for index, content in enumerate(model_files):
                path = os.path.join(directory, f"{index}.keras")
                Path(path).write_bytes(content)
                self.models.append(load_model_file(path))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from digit_models.augmentation import tta_view

        views = [batch["image"], *(tta_view(batch["image"], view).numpy()
                                   for view in range(1, self.views))]
        probabilities = np.mean([model.predict_on_batch(images)
                                 for model in self.models for images in views],
                                axis=0, dtype=np.float32)
        return {
            "ImageId": batch["ImageId"].astype(np.int32),
            "Label": probabilities.argmax(axis=1).astype(np.int32),
            "Confidence": probabilities.max(axis=1),
            **{column: probabilities[:, digit] for digit, column in enumerate(PROBABILITY_COLUMNS)},
        }


def submission_csv(predictions: pa.Table) -> str:
    """Kaggle's format exactly: `ImageId,Label`, one row per image, ImageId ascending."""
    order = np.argsort(predictions.column("ImageId").to_numpy())
    ids = predictions.column("ImageId").to_numpy()[order]
    labels = predictions.column("Label").to_numpy()[order]
    lines = ["ImageId,Label", *(f"{i},{label}" for i, label in zip(ids.tolist(), labels.tolist()))]
    return "\n".join(lines) + "\n"


def _require_every_image_once(predictions: pa.Table, image_ids: np.ndarray, source: str) -> None:
    got = np.sort(predictions.column("ImageId").to_numpy())
    if not np.array_equal(got, np.sort(image_ids)):
        raise DigitsError(f"{source}: the pipeline returned {len(got)} predictions for "
                          f"{len(image_ids)} images; not writing a partial submission")


def _require_replaceable(out: Folder) -> None:
    """The output folder may be new, empty, or an earlier `digits predict` output."""
    if out.exists() and not out.is_folder():
        raise DigitsError(f"{out}: exists and is not a folder")
    if not out.is_empty() and not (out.exists(SCORING_FILE) or out.exists(SCORING_UNDERWAY)):
        raise DigitsError(f"{out}: not empty and not an earlier `digits predict` output; "
                          "refusing to replace it")


def _finished_model_bytes(run: str) -> bytes:
    """The run's model file, checked to load (safe mode) before any scoring starts. Bytes, so
    that actors on any node receive it through Ray rather than reading the driver's disk."""
    from digit_models.models import load_model_file

    folder = Folder(run)
    if not folder.is_folder():
        raise DigitsError(f"{run}: no such run directory")
    if not folder.exists(RUN_FILE):
        raise DigitsError(f"{run}: no {RUN_FILE}, so not a finished run")
    if not folder.is_file(MODEL_FILE):
        raise DigitsError(f"{run}: no {MODEL_FILE}")
    content = folder.read_bytes(MODEL_FILE)
    with tempfile.TemporaryDirectory(prefix="digits-check-") as directory:
        Path(directory, MODEL_FILE).write_bytes(content)
        load_model_file(str(Path(directory, MODEL_FILE)), name=folder.child(MODEL_FILE))
    return content

"""`digits predict`: batch scoring on Ray Data, streaming from the input files to Parquet
predictions and a Kaggle submission.csv.

    read tasks (one per input file: parse, check, number the rows; scoring/predict_input.py)
      -> an actor pool (each actor loads the model(s) once and predicts whole batches)
      -> write tasks (Parquet)

No process holds the whole input or every prediction: blocks of a few thousand rows flow
through the object store. The driver plans the pipeline, then reads back two columns of what
was written (ImageId and Label, a byte per image for Kaggle's numbering), checks that every
ImageId appears exactly once, and writes submission.csv from them. The driver never imports
TensorFlow: it checks the model files (nets/model_file.py), so that a bad one is refused before Ray
starts; the actors check them again as they load them.

Several runs form an ensemble: each actor averages the models' class probabilities, and with
test-time augmentation also over fixed shifted, rotated and zoomed views of each image.

The output folder appears complete or not at all: locally it is assembled beside its final
place and renamed into it; on object stores, which cannot rename, predict.json is written last
and marks a complete output. An earlier output is replaced only if the folder holds nothing
else (OUTPUT), and only its own entries are touched.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from digit_models.config import PredictConfig
from digit_models.runtime.console import live, report_progress
from digit_models.runtime.process_memory import peak_rss_mb
from digit_models.errors import DigitsError, first_line
from digit_models.storage.files import Folder, Output, is_uri, require_output_folder, staged_dir
from digit_models.nets.model_file import check_keras_archive
from digit_models.scoring.ensemble import Ensemble
from digit_models.scoring.predict_input import (
    BLOCK_ROWS,
    Inspections,
    images_datasource,
    open_input,
    require_plausible_row_groups,
)
from digit_models.runtime.ray_runtime import cpus_per_process, on_this_node, put_for_session, ray_session
from digit_models.storage.run_dir import RunDir

PREDICTIONS_DIR = "predictions"  # Parquet
SUBMISSION_FILE = "submission.csv"  # Kaggle's ImageId,Label
RECORD_FILE = "predict.json"  # what was scored, with what, how fast; written last
UNDERWAY_FILE = "predict.underway"  # a run is (or was) writing or replacing the output here
EVALUATION_FILE = "evaluation.json"  # where `digits evaluate` writes by default: describes this output
# What an output folder may hold, the completion record first (the order a replacement removes them in).
OUTPUT = Output(
    command="digits predict",
    record=RECORD_FILE,
    underway=UNDERWAY_FILE,
    entries=(RECORD_FILE, SUBMISSION_FILE, PREDICTIONS_DIR, EVALUATION_FILE, UNDERWAY_FILE),
)
PROBABILITY_COLUMNS = [f"prob_{digit}" for digit in range(10)]
ACTOR_IMAGE_BYTES = 384 << 20  # about 500,000 images: see default_actors
ROWS_PER_FILE = 16_384  # Parquet files of about 0.9 MB, however small Ray's blocks are


def predict(config: PredictConfig, address: str | None = None) -> dict:
    """Scores config.input with the runs' models and writes OUT/predictions/, OUT/submission.csv
    and OUT/predict.json (the completion record). Returns predict.json's content."""
    config.validate()
    started = time.time()
    out = Folder(config.out if is_uri(config.out) else str(Path(config.out).resolve()))
    require_output_folder(out, "refusing to replace it", replaces=OUTPUT)
    runs, models = checked_models(config.runs)
    source = open_input(config.input)

    with ray_session(address), _writing_into(out) as target:
        import ray
        import ray.data

        ray_started = time.time()
        local_input = {} if is_uri(config.input) else on_this_node()
        inspections = Inspections(source, tasks=8, **local_input)
        live.formatter = ScoringProgress(inspections)
        actors = config.actors or default_actors(source)
        cpus = config.cpus_per_actor or cpus_per_process(actors)
        images = ray.data.read_datasource(
            images_datasource(source, inspections),
            num_cpus=0,
            override_num_blocks=len(source.files),
            concurrency=min(len(source.files), 2 * actors),
            **local_input,
        )
        predictions = images.map_batches(
            DigitPredictor,
            fn_constructor_kwargs={
                "models": [put_for_session(model) for model in models],
                "names": [run.child(run.MODEL) for run in runs],
                "cpus": cpus,
                "batch_size": config.batch_size,
                "tta": config.tta,
            },
            # Ray Data hands each actor whole blocks (its per-batch overhead is paid once per
            # block); the actor calls the model on config.batch_size images at a time.
            batch_size=BLOCK_ROWS,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **actor_resources(config, cpus),
        )
        # Writing is light: at zero CPUs it never waits for the actors to free theirs.
        # Through the resolved filesystem: given a URI, Ray Data would keep its query (the
        # store's settings) in the object keys.
        predictions.write_parquet(
            f"{target.path}/{PREDICTIONS_DIR}",
            filesystem=target.fs,
            min_rows_per_file=ROWS_PER_FILE,
            ray_remote_args={"num_cpus": 0, **({} if is_uri(config.out) else on_this_node())},
        )
        scored = time.time()
        files = [
            {"file": file if is_uri(file) else str(Path(file).resolve()), **found}
            for file, found in zip(source.files, inspections.first(len(source.files)))
        ]
        images_total = sum(found["rows"] for found in files)
        write_submission(target, images_total, source.own_ids, config.input)
        record = {
            "runs": [str(run) for run in runs],
            # Absolute, so that readers elsewhere (`digits report`) find the images again.
            "input": config.input if is_uri(config.input) else str(Path(config.input).resolve()),
            "input_files": files,
            "images": images_total,
            "nodes": sum(node["Alive"] for node in ray.nodes()),
            "actors": actors,
            "cpus_per_actor": cpus,
            "gpus_per_actor": config.gpus_per_actor,
            "batch_size": config.batch_size,
            "tta_extra_views": config.tta,  # --tta: views of each image besides the image itself
            "views_per_image": 1 + config.tta,  # what each model's prediction of an image averages
            "seconds": {
                "ray_start": round(ray_started - started, 3),
                "pipeline": round(scored - ray_started, 3),
                "submission": round(time.time() - scored, 3),
            },
            "images_per_s": round(images_total / (scored - ray_started), 1),
            "wall_s": round(time.time() - started, 3),
            "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            "predictions": PREDICTIONS_DIR,
            "submission": SUBMISSION_FILE,
        }
        target.write_json(RECORD_FILE, record)  # last
    return record


def checked_models(given: list[str]) -> tuple[list[RunDir], list[bytes]]:
    """The runs of an ensemble and their model files, checked without TensorFlow (so that a
    bad one is refused before Ray starts): bytes, so that processes on any node receive them
    through Ray rather than reading this disk."""
    runs = [RunDir(run) for run in given]
    require_distinct(runs)
    models = [run.model_bytes() for run in runs]
    for run, model in zip(runs, models):
        check_keras_archive(model, run.child(run.MODEL))
    return runs, models


def require_distinct(runs: list[RunDir]) -> None:
    """An ensemble's members are different run directories: the same one twice (however
    spelled: RunDir resolves a local path) would be scored twice and weigh double, most likely
    by a slip of the hand."""
    first = {}
    for run in runs:
        if run.location in first:
            raise DigitsError(
                f"--run {run.given}: the same run as --run {first[run.location].given}; "
                "give each member of an ensemble once"
            )
        first[run.location] = run


@contextmanager
def _writing_into(out: Folder):
    """The folder to write the output into. Locally: a hidden staging folder whose entries
    take their place in `out` once complete. Remotely (object stores cannot rename): `out`
    itself, marked as underway and cleared of the previous output (completion record first),
    so that only a finished run has a completion record, and an interrupted one can be
    overwritten by the next."""
    if out.is_local:
        with staged_dir(Path(out.path), replaces=OUTPUT) as staging:
            yield Folder(str(staging))
        return
    out.create()
    out.write_text(UNDERWAY_FILE, "")
    for name in OUTPUT.entries:
        if name != UNDERWAY_FILE:
            out.delete(name)
    yield out
    out.delete(UNDERWAY_FILE)


def default_actors(source) -> int:
    """One scoring actor for an input of up to ACTOR_IMAGE_BYTES of images, where a second one
    would cost more to start than it saves; one per ACTOR_IMAGE_BYTES beyond, up to one per
    CPU of the cluster."""
    import ray

    wanted = -(-source.image_bytes // ACTOR_IMAGE_BYTES)
    return max(1, min(wanted, int(ray.cluster_resources().get("CPU", 1))))


def actor_resources(config: PredictConfig, cpus: int) -> dict:
    """What each scoring actor asks Ray for; a GPU only when asked for."""
    return {"num_cpus": cpus, **({"num_gpus": config.gpus_per_actor} if config.gpus_per_actor else {})}


class DigitPredictor:
    """One per scoring actor: loads the models once, then predicts whole batches.

    A model that will not load is reported by the first batch, not by the constructor: Ray
    keeps the error of a failed batch intact, where a failed actor constructor reaches the
    driver as text inside an ActorDiedError (and is printed on the console besides, even when
    the pipeline has already failed for another reason and the models are gone)."""

    def __init__(self, models: list, names: list[str], cpus: int, batch_size: int, tta: int = 0):
        import ray

        from digit_models.runtime.tf_setup import configure_tensorflow

        configure_tensorflow(cpus)
        self.ensemble, self.error = None, None
        try:
            self.ensemble = Ensemble([ray.get(model) for model in models], names, tta=tta, batch_size=batch_size)
        except Exception as exc:  # noqa: BLE001  (raised again by the first batch)
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error:
            raise self.error
        images = batch["image"]
        probabilities = self.ensemble.probabilities(images)
        report_progress(images=len(images))
        return {
            "ImageId": batch["ImageId"].astype(np.int32),
            "Label": probabilities.argmax(axis=1).astype(np.int32),
            "Confidence": probabilities.max(axis=1),
            **{column: probabilities[:, digit] for digit, column in enumerate(PROBABILITY_COLUMNS)},
        }


class ScoringProgress:
    """The driver's live line while scoring: images done (of the total, once the files are
    counted), images/s so far, and time left."""

    def __init__(self, inspections: Inspections):
        self.inspections, self.done, self.started = inspections, 0, time.monotonic()

    def __call__(self, message: dict) -> dict:
        self.done += message["images"]
        rate = self.done / max(time.monotonic() - self.started, 1e-3)
        total = self.inspections.rows_if_counted()
        if total is None:
            return {"text": f"scoring: {self.done:,} images, {rate:,.0f} images/s"}
        left = max(total - self.done, 0) / rate
        return {
            "text": f"scoring: {self.done:,} of {total:,} images, {rate:,.0f} images/s, {left:.0f}s left",
            "left_s": round(left, 1),
        }


# ---------------------------------------------------------------------------- submission.csv


def write_submission(target: Folder, images: int, own_ids: bool, source: str) -> None:
    """Kaggle's format exactly (`ImageId,Label`, one row per image, ImageId ascending), from
    the ImageId and Label columns of the written predictions, after checking that every
    ImageId of the input is there exactly once."""
    ids, labels = (_sorted_own_ids if own_ids else _labels_by_row)(_written_labels(target), images, source)
    with target.open_output(SUBMISSION_FILE) as stream:
        stream.write(b"ImageId,Label\n")
        for start in range(0, len(labels), 1 << 20):
            end = min(start + (1 << 20), len(labels))
            part_ids = ids[start:end] if ids is not None else np.arange(start + 1, end + 1, dtype=np.int32)
            pacsv.write_csv(
                pa.table({"ImageId": part_ids, "Label": labels[start:end]}),
                stream,
                write_options=pacsv.WriteOptions(include_header=False),
            )


def _written_labels(target: Folder):
    """The ImageId and Label columns of the written predictions, a file at a time in this
    thread: the dataset scanner, reading ahead in several files and threads at once, left its
    buffers with the allocator, and the driver's peak memory grew with the images scored."""
    import pyarrow.dataset as pads  # here: its import (pandas) would delay every bad-input error
    import pyarrow.parquet as pq

    written = pads.dataset(f"{target.path}/{PREDICTIONS_DIR}", filesystem=target.fs, format="parquet")
    for fragment in written.get_fragments():
        with pq.ParquetFile(fragment.path, filesystem=target.fs) as file:
            yield from file.iter_batches(batch_size=1 << 16, columns=["ImageId", "Label"], use_threads=False)


def _labels_by_row(batches, images: int, source: str) -> tuple[None, np.ndarray]:
    """For ImageIds 1..images: one byte per image, filled in as predictions arrive (the ids
    are the positions)."""
    unseen = 255
    labels = np.full(images, unseen, np.uint8)
    for batch in batches:
        positions = batch.column("ImageId").to_numpy() - 1
        if len(positions) and (positions.min() < 0 or positions.max() >= images):
            raise DigitsError(f"{source}: the pipeline returned ImageIds outside 1-{images}; not writing a submission")
        if (labels[positions] != unseen).any() or len(np.unique(positions)) < len(positions):
            raise DigitsError(f"{source}: the pipeline returned some ImageIds twice; not writing a submission")
        labels[positions] = batch.column("Label").to_numpy()
    missing = np.flatnonzero(labels == unseen)
    if len(missing):
        raise DigitsError(
            f"{source}: the pipeline returned no prediction for ImageId "
            f"{missing[0] + 1} ({len(missing)} missing); not writing a submission"
        )
    return None, labels


def _sorted_own_ids(batches, images: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """For an input's own ImageIds: five bytes per image, sorted."""
    parts = [
        (batch.column("ImageId").to_numpy(), batch.column("Label").to_numpy().astype(np.uint8)) for batch in batches
    ]
    ids = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0, np.int32)
    labels = np.concatenate([part[1] for part in parts]) if parts else np.zeros(0, np.uint8)
    order = np.argsort(ids, kind="stable")
    ids, labels = ids[order], labels[order]
    repeated = np.flatnonzero(ids[1:] == ids[:-1])
    if len(repeated):
        raise DigitsError(f"{source}: column ImageId: {ids[repeated[0]]} appears more than once")
    if len(ids) != images:
        raise DigitsError(
            f"{source}: the pipeline returned {len(ids)} predictions for {images} images; not writing a submission"
        )
    return ids, labels


# ---------------------------------------------------------------------------- reading it back


def read_back(folder: Folder, columns: list[str]) -> pa.Table:
    """These columns of a complete output's predictions (for `digits evaluate` and `digits
    report`, which may be given any folder). The Parquet files' footers are checked before any
    data is read: as many rows as predict.json counts images, row groups no larger than their
    rows can be, so that a damaged or crafted folder is refused in one line, not read."""
    import pyarrow.dataset as pads  # here: its import (pandas) would delay every bad-input error

    if not folder.exists(RECORD_FILE):
        raise DigitsError(f"{folder}: no {RECORD_FILE}, so not a complete `digits predict` output")
    record = folder.read_json(RECORD_FILE)
    images = record.get("images") if isinstance(record, dict) else None
    if not isinstance(images, int) or images < 0:
        raise DigitsError(f"{folder.child(RECORD_FILE)}: no count of the images scored")
    where = folder.child(PREDICTIONS_DIR)
    try:
        written = pads.dataset(f"{folder.path}/{PREDICTIONS_DIR}", filesystem=folder.fs, format="parquet")
        rows = 0
        for fragment in written.get_fragments():
            name = fragment.path.rsplit("/", 1)[-1]
            require_plausible_row_groups(fragment.metadata, columns, folder.child(f"{PREDICTIONS_DIR}/{name}"))
            rows += fragment.metadata.num_rows
        if rows != images:
            raise DigitsError(f"{where}: {rows:,} rows, but {RECORD_FILE} counts {images:,} images")
        return written.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DigitsError(f"{where}: not readable as Parquet: {first_line(exc)}") from None

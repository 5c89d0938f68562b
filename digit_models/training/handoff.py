"""What the driver hands every training worker, typed: driver.py fills it in and Ray Train
carries it (in train_loop_config) to worker.py, which reads nothing else. And what comes back
with each checkpoint that the driver chooses by."""

from __future__ import annotations

from dataclasses import dataclass

from digit_models.config import TrainConfig


@dataclass(frozen=True)
class Shares:
    """Rows in Ray's object store (ObjectRefs), fetched by every worker."""
    images: object
    labels: object
    rows: object | None = None  # the rows' numbers in train.csv (validation rows only)


@dataclass(frozen=True)
class WorkerInputs:
    config: TrainConfig
    train: Shares
    validation: Shares
    rows_total: int  # rows read from train.csv: training and validation
    run_dir: str  # where checkpoints/, attempts/ and tensorboard/ go (a path every node reaches)
    mlflow_run_id: str | None
    faults: list[tuple[str, int, int]]  # DIGITS_FAULT's (moment, epoch, rank), for fault tests
    driver_session: int  # 0 for the command that started the run, N for its Nth --resume
    command_started_unix: float  # when the command started (the time budget counts from it)


# The metric of a reported checkpoint that Ray Train keeps the best by (with --keep best) and
# the driver takes model.keras from: an epoch's val_accuracy; below any accuracy for a
# checkpoint taken within an epoch (its weights were never validated) or without validation.
MODEL_SCORE = "model_score"
UNVALIDATED = -1.0

"""What crosses between the training processes, typed: what the driver hands every worker
(driver.py fills it in, Ray Train carries it in train_loop_config to worker.py, which reads
nothing else); the training state a checkpoint carries from one worker group to the next; and
what the workers hand back, with each checkpoint and at the end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from digit_models.config import TrainConfig


@dataclass(frozen=True)
class Shares:
    """Rows in Ray's object store, fetched by every worker: the images and the labels as lists
    of ObjectRefs, one per part of train.csv (driver.put_rows), in the file's order."""

    images: list
    labels: list
    rows: object | None = None  # an ObjectRef: the rows' numbers in train.csv (validation rows only)


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


@dataclass
class TrainingState:
    """What a run has done: the epochs and their metrics, and why it stopped. The workers'
    callbacks write it (callbacks.EpochHistory the epochs and the stop, schedule.TimeBudget its
    plan); every checkpoint's state.json holds it, and a new worker group starts from it."""

    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)  # an entry per epoch: its metrics and times
    stop_reason: str | None = None
    global_batch: int | None = None  # images per update of the worker group that saved it
    time_budget: dict | None = None  # --time-budget's sizing: the epochs' times and the plans

    def epochs_planned(self, epochs: int) -> int:
        """The run's epochs: its time budget's latest plan once it has one, else `epochs`."""
        return (self.time_budget or {}).get("epochs_planned", epochs)

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> TrainingState:
        """From a state.json's content, whatever else the file holds beside it."""
        return cls(**{known.name: record[known.name] for known in fields(cls) if known.name in record})


@dataclass(frozen=True)
class WorkerOutcome:
    """What rank 0 returns when the run has ended: the state, and its worker group's own."""

    state: TrainingState
    workers: int  # the last worker group's size
    shards: dict  # which rows each worker trained and validated on
    timeline: dict  # when each stage of the worker began (unix seconds)
    preemption_checks: dict  # callbacks.PreemptionNotice's cost
    worker_process: dict  # rank 0's CPUs (threads), niceness and dtype policy


# The metric of a reported checkpoint that Ray Train keeps the best by (with --keep best) and
# the driver takes model.keras from: an epoch's val_accuracy; below any accuracy for a
# checkpoint taken within an epoch (its weights were never validated) or without validation.
MODEL_SCORE = "model_score"
UNVALIDATED = -1.0

"""Run configuration: one dataclass per command, validated before anything runs.

Kept free of TensorFlow and Ray imports so the CLI can parse and check arguments quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

from digit_models.errors import DigitsError

TARGET_METRICS = ("accuracy", "val_accuracy")


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in run.json."""

    data: str = "data"  # a folder holding train.csv, or a train.csv path or URI
    out: str = "runs/cnn"  # the run directory
    model: str = "cnn"
    epochs: int = 10
    workers: int = 1
    batch_size: int = 32  # per worker
    learning_rate: float = 1e-3
    target: float = 0.999
    target_metric: str = "accuracy"
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    cpus_per_worker: int | None = None  # None: the CPUs Ray has, split between the workers
    gpus_per_worker: float = 0.0
    mixed_precision: bool = False
    max_failures: int = 1

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise DigitsError(message)

        from digit_models.models import MODELS

        require(self.model in MODELS, f"--model {self.model}: choose one of {', '.join(sorted(MODELS))}")
        require(self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1")
        require(self.workers >= 1, f"--workers {self.workers}: must be at least 1")
        require(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1")
        require(self.learning_rate > 0, f"--learning-rate {self.learning_rate}: must be positive")
        require(0 < self.target <= 1, f"--target {self.target}: must be in (0, 1]")
        require(self.target_metric in TARGET_METRICS,
                f"--target-metric {self.target_metric}: choose one of {', '.join(TARGET_METRICS)}")
        require(0 <= self.val_fraction < 1, f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        require(self.target_metric != "val_accuracy" or self.val_fraction > 0,
                "--target-metric val_accuracy needs a validation split (--val-fraction > 0)")
        require(self.limit is None or self.limit >= 1, f"--limit {self.limit}: must be at least 1")
        require(self.cpus_per_worker is None or self.cpus_per_worker >= 1,
                f"--cpus-per-worker {self.cpus_per_worker}: must be at least 1")
        require(self.gpus_per_worker >= 0, f"--gpus-per-worker {self.gpus_per_worker}: must be >= 0")
        require(self.max_failures >= 0, f"--max-failures {self.max_failures}: must be >= 0")


@dataclass
class ScoreConfig:
    """A batch-scoring run: which trained runs (averaged when several), what input, where to."""

    runs: list[str]
    input: str
    out: str
    batch_size: int = 1024
    actors: int = 1
    cpus_per_actor: int | None = None  # None: the CPUs Ray has, split between the actors
    gpus_per_actor: float = 0.0

    def validate(self) -> None:
        if not self.runs:
            raise DigitsError("--run: give at least one run directory")
        for value, flag in ((self.batch_size, "--batch-size"), (self.actors, "--actors")):
            if value < 1:
                raise DigitsError(f"{flag} {value}: must be at least 1")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 1:
            raise DigitsError(f"--cpus-per-actor {self.cpus_per_actor}: must be at least 1")
        if self.gpus_per_actor < 0:
            raise DigitsError(f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0")

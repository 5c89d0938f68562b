"""Run configuration: one dataclass per command, validated before anything runs.

Kept free of TensorFlow and Ray imports so the CLI can parse and check arguments quickly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from digit_models.errors import DigitsError

MODEL_NAMES = ("dense", "cnn", "deep_cnn")  # nets/models.py's registry (a test checks they agree)
MODELS_WITH_DROPOUT = ("deep_cnn",)  # the registry's builders that take a dropout rate (tested too)
TARGET_METRICS = ("accuracy", "val_accuracy")
ALL_REDUCE_DTYPES = ("float32", "bfloat16")
PRECISIONS = ("auto", "float32", "bfloat16")
# Which epoch's model a run's model.keras is: the best by val_accuracy, or the last.
KEEP_CHOICES = ("best", "last")
LR_SCHEDULES = ("constant", "cosine")
EXPORT_FORMATS = ("savedmodel", "tflite")  # digits export (nets/export.py)
MAX_TTA = 8  # extra test-time views: augmentation.TTA_VIEWS has this many after the identity

# Settings a preset chooses; options given on the command line still win. Both presets stop
# on validation accuracy, not the seed's training accuracy: augmented training images stay
# harder than the real ones, so training accuracy would lag and never say when to stop. Both
# scale the learning rate with the global batch, so that more workers keep the accuracy of one
# (docs/accuracy.md has the measurements behind these choices).
PRESETS = {
    # 99% on held-out data soonest: the seed's CNN with larger batches (fewer, cheaper steps
    # per image, and fewer all-reduces per image between workers) and a short warm-up + cosine
    # schedule over 3 epochs.
    "fast": dict(
        model="cnn",
        batch_size=128,
        learning_rate=3e-3,
        lr_schedule="cosine",
        epochs=3,
        target_metric="val_accuracy",
        target=0.99,
        scale_learning_rate=True,
    ),
    # The highest accuracy of one run within an hour on 2 CPU cores: the BatchNorm CNN,
    # augmented, with label smoothing, trained for every planned epoch (the schedule's
    # low-rate end is where the last errors go; a target of 1.0 only stops a perfect run),
    # its weights averaged (no worse on validation: docs/accuracy.md's "The weight average"),
    # BatchNorm's statistics taken from plain images, and half the model's dropout (each
    # fewer errors on held-out images: docs/accuracy.md's "BatchNorm statistics" and "Dropout").
    "best": dict(
        model="deep_cnn",
        dropout=0.2,
        batch_size=64,
        learning_rate=2e-3,
        lr_schedule="cosine",
        augment=True,
        label_smoothing=0.1,
        weight_average=0.999,
        recompute_batchnorm=True,
        epochs=30,
        target_metric="val_accuracy",
        target=1.0,
        scale_learning_rate=True,
    ),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in run.json."""

    data: str = "data"  # a folder holding train.csv, or a train.csv path or URI
    out: str = "runs/cnn"  # the run directory
    model: str = "cnn"
    epochs: int = 10
    workers: int = 1  # the most workers; the run starts and grows to this many when it can
    min_workers: int | None = None  # the fewest it goes on with after losing nodes; None: workers
    batch_size: int = 32  # per worker
    accumulate: int = 1  # micro-batches of batch_size whose gradients make one update
    sync_every: int = 1  # batches each worker trains on alone between two averagings of the weights
    all_reduce_dtype: str | None = None  # None: bfloat16 between CPU workers, float32 between GPUs
    learning_rate: float = 1e-3
    scale_learning_rate: bool = False  # times sqrt(workers x accumulate): see step_learning_rate
    target: float = 0.999
    target_metric: str = "accuracy"
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    cpus_per_worker: int | None = None  # None: the CPUs Ray has, split between the workers
    gpus_per_worker: float = 0.0
    precision: str = "auto"  # what the layers compute in (PRECISIONS): see compute_policy
    max_failures: int = 1
    max_preemptions: int = 10  # restarts after a node's preemption, counted apart from failures
    wait_for_workers: float = 600.0  # seconds a run below min_workers waits for nodes, then ends
    augment: bool = False  # random rotations, shifts and zooms of the training images
    lr_schedule: str = "constant"  # or "cosine": warm-up (an epoch or a tenth of the run), then decay to 0
    label_smoothing: float = 0.0
    dropout: float | None = None  # the rate of the model's dropout layers; None: the model's own
    weight_average: float = 0.0  # per-step momentum of the weights' moving average; 0: none (WeightAverage)
    recompute_batchnorm: bool = False  # BatchNorm statistics from plain images, dropout off (training/batchnorm.py)
    preset: str | None = None  # the preset the settings started from, for the record
    mlflow: str | None = None  # MLflow tracking URI to log the run to (training/mlflow_log.py)
    time_budget: float | None = (
        None  # minutes for the whole run; epochs sized as the first half goes (training/schedule.py)
    )
    scoring_reserve: int = 0  # images (rows x views) this model will score within the budget (training/schedule.py)
    profile_steps: list[int] | None = None  # [FIRST, LAST]: the steps every worker traces (tensorboard_log.StepProfile)
    keep: str = "best"  # model.keras: the epoch of the best val_accuracy ("best") or the last epoch ("last")

    @property
    def fewest_workers(self) -> int:
        return self.workers if self.min_workers is None else self.min_workers

    def step_learning_rate(self, workers: int) -> float:
        """The rate per update with `workers` workers (an elastic run's group can be smaller
        than --workers): with scaling, grown with the square root of how many batches make
        one update (workers x accumulate), as an update averages over that many more images
        (the square root keeps Adam stable where the linear rule overshoots). With --sync-every
        an update is one worker's, of one batch: the rate is not scaled."""
        batches_per_update = workers * self.accumulate if self.sync_every == 1 else 1
        factor = batches_per_update**0.5 if self.scale_learning_rate else 1.0
        return self.learning_rate * factor

    def global_batch(self, workers: int) -> int:
        """Images of one step of `workers` workers: one update (x --accumulate), or with
        --sync-every K the K updates of each worker between two averagings."""
        return self.batch_size * self.accumulate * self.sync_every * workers

    def compute_policy(self, cpu_has_bfloat16: bool | None) -> str:
        """Keras's dtype policy for a worker whose CPU has (or lacks, or cannot tell about)
        bfloat16 instructions. The weights and the softmax stay float32 under every policy.
        `auto` computes in float16 on GPUs (their fast path, with loss scaling) and in bfloat16
        on CPUs that have AVX512-BF16 or AMX, where it runs natively and keeps float32's range
        (no loss scaling); float32 on other CPUs, where bfloat16 is emulated, and where float16
        has no fast path on any CPU."""
        if self.precision == "float32":
            return "float32"
        if self.precision == "bfloat16":
            return "mixed_bfloat16"
        if self.gpus_per_worker:
            return "mixed_float16"
        return "mixed_bfloat16" if cpu_has_bfloat16 else "float32"

    @property
    def gradient_dtype(self) -> str:
        """What the gradients are summed across workers in: on CPUs an all-reduce costs by the
        byte, and bfloat16 halves the bytes while keeping float32's range."""
        return self.all_reduce_dtype or ("float32" if self.gpus_per_worker else "bfloat16")

    @classmethod
    def from_preset(cls, preset: str | None, **settings) -> "TrainConfig":
        """A preset's settings, overridden by `settings` (the options a user gave)."""
        if preset is not None and preset not in PRESETS:
            raise DigitsError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
        chosen = {**(PRESETS[preset] if preset else {}), **settings, "preset": preset}
        if "dropout" not in settings and chosen.get("model") not in MODELS_WITH_DROPOUT:
            chosen.pop("dropout", None)  # the preset's rate is its own model's: `--model cnn` drops it
        return cls(**chosen)

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise DigitsError(message)

        require(self.model in MODEL_NAMES, f"--model {self.model}: choose one of {', '.join(sorted(MODEL_NAMES))}")
        require(self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1")
        require(self.precision in PRECISIONS, f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        require(self.keep in KEEP_CHOICES, f"--keep {self.keep}: choose one of {', '.join(KEEP_CHOICES)}")
        require(self.workers >= 1, f"--workers {self.workers}: must be at least 1")
        require(
            1 <= self.fewest_workers <= self.workers,
            f"--min-workers {self.min_workers}: must be 1 to --workers ({self.workers})",
        )
        require(self.max_preemptions >= 0, f"--max-preemptions {self.max_preemptions}: must be >= 0")
        require(self.wait_for_workers > 0, f"--wait-for-workers {self.wait_for_workers}: must be positive (seconds)")
        require(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1")
        require(self.accumulate >= 1, f"--accumulate {self.accumulate}: must be at least 1")
        require(self.sync_every >= 1, f"--sync-every {self.sync_every}: must be at least 1")
        require(
            self.accumulate == 1 or self.sync_every == 1,
            f"--accumulate {self.accumulate} with --sync-every {self.sync_every}: choose one",
        )
        require(
            self.sync_every == 1 or not self.weight_average,
            f"--weight-average with --sync-every {self.sync_every}: each worker's average would be its own",
        )
        require(
            self.all_reduce_dtype is None or self.all_reduce_dtype in ALL_REDUCE_DTYPES,
            f"--all-reduce-dtype {self.all_reduce_dtype}: choose one of {', '.join(ALL_REDUCE_DTYPES)}",
        )
        require(self.learning_rate > 0, f"--learning-rate {self.learning_rate}: must be positive")
        require(0 < self.target <= 1, f"--target {self.target}: must be in (0, 1]")
        require(
            self.target_metric in TARGET_METRICS,
            f"--target-metric {self.target_metric}: choose one of {', '.join(TARGET_METRICS)}",
        )
        require(0 <= self.val_fraction < 1, f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        require(
            self.target_metric != "val_accuracy" or self.val_fraction > 0,
            "--target-metric val_accuracy needs a validation split (--val-fraction > 0)",
        )
        require(self.limit is None or self.limit >= 1, f"--limit {self.limit}: must be at least 1")
        require(
            self.cpus_per_worker is None or self.cpus_per_worker >= 1,
            f"--cpus-per-worker {self.cpus_per_worker}: must be at least 1",
        )
        require(self.gpus_per_worker >= 0, f"--gpus-per-worker {self.gpus_per_worker}: must be >= 0")
        require(self.max_failures >= 0, f"--max-failures {self.max_failures}: must be >= 0")
        require(
            self.lr_schedule in LR_SCHEDULES,
            f"--lr-schedule {self.lr_schedule}: choose one of {', '.join(LR_SCHEDULES)}",
        )
        require(0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        require(
            self.dropout is None or self.model in MODELS_WITH_DROPOUT,
            f"--dropout: model {self.model} has no dropout layers (these do: {', '.join(MODELS_WITH_DROPOUT)})",
        )
        require(self.dropout is None or 0 <= self.dropout < 1, f"--dropout {self.dropout}: must be in [0, 1)")
        require(0 <= self.weight_average < 1, f"--weight-average {self.weight_average}: must be in [0, 1)")
        require(
            self.time_budget is None or self.time_budget > 0,
            f"--time-budget {self.time_budget}: must be positive (minutes)",
        )
        require(self.scoring_reserve >= 0, f"--scoring-reserve {self.scoring_reserve}: must be >= 0")
        require(
            not self.scoring_reserve or self.time_budget is not None,
            "--scoring-reserve keeps time free in a --time-budget: give one",
        )
        require(
            self.profile_steps is None
            or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]),
            f"--profile-steps {':'.join(map(str, self.profile_steps or []))}: must be FIRST:LAST with 1 <= FIRST <= LAST",
        )
        require(
            self.preset is None or self.preset in PRESETS, f"--preset {self.preset}: choose one of {', '.join(PRESETS)}"
        )


@dataclass
class SearchConfig:
    """A `digits tune` search: what every trial shares, and how many trials of what size.

    Each trial is a TrainConfig: the preset's settings, then `fixed` (the `digits train`
    options given on the command line), then the trial's sample of the space
    (tuning/space.py)."""

    data: str
    out: str
    trials: int
    preset: str | None = None
    space_file: str | None = None  # None: the preset's default space
    fixed: dict = field(default_factory=dict)  # TrainConfig fields, the same in every trial
    workers_per_trial: int = 1
    time_budget: float | None = None  # minutes for the whole search
    search_seed: int = 0  # the searcher's, apart from --seed (the trials' split and order)

    def base(self) -> TrainConfig:
        """A trial's configuration before its sample (its --out is its own, under TUNE_DIR)."""
        return TrainConfig.from_preset(
            self.preset, **{**self.fixed, "data": self.data, "workers": self.workers_per_trial}
        )

    def validate(self) -> None:
        if self.trials < 1:
            raise DigitsError(f"--trials {self.trials}: must be at least 1")
        if self.workers_per_trial < 1:
            raise DigitsError(f"--workers-per-trial {self.workers_per_trial}: must be at least 1")
        if self.time_budget is not None and self.time_budget <= 0:
            raise DigitsError(f"--time-budget {self.time_budget}: must be positive (minutes)")
        base = self.base()
        base.validate()
        if base.val_fraction <= 0:
            raise DigitsError(
                "--val-fraction 0: `digits tune` ranks the trials by their validation "
                "accuracy, so it needs a validation split"
            )


@dataclass
class PredictConfig:
    """A batch-scoring run: which trained runs (averaged when several), what input, where to."""

    runs: list[str]
    input: str
    out: str
    batch_size: int = 1024
    actors: int | None = None  # None: one per ACTOR_IMAGE_BYTES of input, up to one per CPU
    cpus_per_actor: int | None = None  # None: the CPUs Ray has, split between the actors
    gpus_per_actor: float = 0.0
    tta: int = 0  # extra test-time views averaged with each image's own prediction

    def validate(self) -> None:
        if not 0 <= self.tta <= MAX_TTA:
            raise DigitsError(f"--tta {self.tta}: must be 0 to {MAX_TTA}")
        if not self.runs:
            raise DigitsError("--run: give at least one run directory")
        for value, flag in ((self.batch_size, "--batch-size"), (self.actors or 1, "--actors")):
            if value < 1:
                raise DigitsError(f"{flag} {value}: must be at least 1")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 1:
            raise DigitsError(f"--cpus-per-actor {self.cpus_per_actor}: must be at least 1")
        if self.gpus_per_actor < 0:
            raise DigitsError(f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0")


@dataclass
class ServeConfig:
    """`digits serve`: which trained runs answer (averaged when several), with what test-time
    augmentation, on how many replicas, where."""

    runs: list[str]
    tta: int = 0
    replicas: int = 1
    port: int = 8000
    cpus_per_replica: float = 1.0  # what each replica asks Ray for; its TensorFlow threads: at least 1
    gpus_per_replica: float = 0.0
    # @serve.batch: a batch goes to the model once it holds this many requests or once the
    # first has waited this long (docs/serve.md, "Batching", has the measurement).
    max_batch_size: int = 32
    batch_wait_s: float = 0.001

    def validate(self) -> None:
        if not self.runs:
            raise DigitsError("--run: give at least one run directory")
        if not 0 <= self.tta <= MAX_TTA:
            raise DigitsError(f"--tta {self.tta}: must be 0 to {MAX_TTA}")
        if self.replicas < 1:
            raise DigitsError(f"--replicas {self.replicas}: must be at least 1")
        if not 1 <= self.port <= 65535:
            raise DigitsError(f"--port {self.port}: must be 1 to 65535")
        if self.cpus_per_replica < 0:
            raise DigitsError(f"--cpus-per-replica {self.cpus_per_replica}: must be >= 0")
        if self.gpus_per_replica < 0:
            raise DigitsError(f"--gpus-per-replica {self.gpus_per_replica}: must be >= 0")
        if self.max_batch_size < 1:
            raise DigitsError(f"--max-batch-size {self.max_batch_size}: must be at least 1")
        if not 0 <= self.batch_wait_s <= 1:
            raise DigitsError(f"--batch-wait-ms {1000 * self.batch_wait_s:g}: must be 0 to 1000")

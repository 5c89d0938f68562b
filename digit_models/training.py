"""Data-parallel training on Ray Train: one `train_func` per worker, a thin driver `train`.

Each worker receives its own shard of the training rows through Ray Data (so workers on other
machines never need the driver's disk), keeps it in memory, and trains the registered model
under MultiWorkerMirroredStrategy: gradients are all-reduced every step, and the global batch is
the per-worker batch times the number of workers. After every epoch each worker reports its
metrics and rank 0 a checkpoint (model, optimizer state, history) through `ray.train.report`;
a restarted worker group resumes from that checkpoint.

The accuracy target is decided collectively: every worker votes whether its metric reached the
target, the votes are all-reduced, and all workers stop at the same epoch. A worker deciding
alone would leave `fit()` while the others wait forever in the next step's all-reduce.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import digit_models
from digit_models.tf_setup import configure_tensorflow, keras, tf  # before Ray Train's TensorFlow
import ray
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from digit_models.augmentation import Augmentation, random_affine
from digit_models.kaggle_csv import NUM_CLASSES, file_sha256, read_train_csv, resolve_train_csv
from digit_models.errors import DigitsError
from digit_models.run_dir import RunDir
from digit_models.config import TrainConfig
from digit_models.models import build_model
from digit_models.ray_runtime import call_interruptibly, cpus_per_process, images_dataset, ray_session


# Training steps per call from Python into TensorFlow. The seed's dense net is so small that the
# round trip of a call was most of each step (measured on 2 cores: 12,600 -> 20,700 images/s
# with 1 worker, 4,000 -> 5,600 with 2; the CNN, 40x the arithmetic per image, unchanged).
STEPS_PER_EXECUTION = 16


# ---------------------------------------------------------------------------- the driver side

def train(config: TrainConfig, address: str | None = None) -> dict:
    """Trains on Ray and writes RUN_DIR/model.keras and run.json; returns run.json's content.

    Input is read and validated before Ray starts or anything is written. Ray is the one
    already connected, else the cluster at `address`, else an embedded local one. While the
    run trains, RUN_DIR holds started.json (what `resume` needs) and Ray's checkpoints;
    model.keras and then run.json appear only at the end, each atomically, so a run dir
    without run.json is an unfinished run.
    """
    config.validate()
    run_dir = RunDir(config.out)
    run_dir.require_new()
    return _run(config, run_dir, address, started=None)


def resume(run_dir: str, address: str | None = None) -> dict:
    """Continues an unfinished run (driver stopped by Ctrl-C, SIGTERM or a lost machine) from
    its last checkpoint, with its original configuration and the same training data."""
    folder = RunDir(run_dir)
    started = folder.read_started()
    try:
        config = TrainConfig(**started["config"])
    except (TypeError, KeyError) as exc:
        raise DigitsError(f"{folder.child(folder.STARTED)}: unreadable ({exc})") from None
    config.validate()
    return _run(config, folder, address, started=started)


def _run(config: TrainConfig, run_dir: RunDir, address: str | None, started: dict | None) -> dict:
    train_csv = resolve_train_csv(config.data)
    digits = read_train_csv(train_csv, limit=config.limit)
    data_sha256 = file_sha256(train_csv)
    if started and started["data"]["sha256"] != data_sha256:
        raise DigitsError(f"{train_csv}: changed since the run started (sha256 {data_sha256}, "
                          f"was {started['data']['sha256']}); cannot resume on different data")
    train_rows, val_rows = validation_split(len(digits), config.val_fraction, config.seed)
    too_few_val = config.val_fraction > 0 and len(val_rows) < config.workers
    if len(train_rows) // config.workers < config.batch_size or too_few_val:
        raise DigitsError(f"{train_csv}: {len(digits)} rows are too few for {config.workers} "
                          f"worker(s) with --batch-size {config.batch_size} and "
                          f"--val-fraction {config.val_fraction}")
    clock = time.time()
    with ray_session(address, dashboard=True):
        now = _utc(clock)
        if started:
            started["resumed_at"].append(now)
        else:
            started = {"config": asdict(config), "started_at": now, "resumed_at": [],
                       "data": {"train_csv": train_csv, "sha256": data_sha256,
                                "rows_read": len(digits), "train_rows": len(train_rows),
                                "validation_rows": len(val_rows)}}
        run_dir.write_started(started)
        blocks = 4 * config.workers
        trainer = TensorflowTrainer(
            train_func,
            train_loop_config={"config": asdict(config), "train_rows_total": len(digits)},
            scaling_config=scaling_config(config),
            datasets={name: images_dataset(digits.images[rows], blocks, row=rows.astype(np.int32),
                                           label=digits.labels[rows])
                      for name, rows in (("train", train_rows), ("validation", val_rows))},
            # The same name and storage path on resume: Ray Train then restores its
            # checkpoint bookkeeping and hands the workers the latest checkpoint.
            run_config=ray.train.RunConfig(
                name=RunDir.CHECKPOINTS, storage_path=run_dir.location,
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        result = call_interruptibly(trainer.fit)
    outcome = result.return_value
    with tempfile.TemporaryDirectory(prefix="digits-model-") as staging:
        result.checkpoint.to_directory(staging)
        run_dir.write_bytes(RunDir.MODEL, Path(staging, RunDir.MODEL).read_bytes())
    summary = {
        "model": config.model,
        "workers": config.workers,
        "batch_size_per_worker": config.batch_size,
        "global_batch_size": config.batch_size * config.workers,
        "epochs_planned": config.epochs,
        "epochs_run": outcome["epochs_done"],
        "stop_reason": outcome["stop_reason"],
        "history": outcome["history"],
        "shards": outcome["shards"],
        "restarts": outcome["restarts"],
        "data": started["data"],
        "config": asdict(config),
        "versions": library_versions(),
        "model_file": RunDir.MODEL,
        "started_at": started["started_at"],
        "resumed_at": started["resumed_at"],
        "wall_s": round(time.time() - clock, 2),
    }
    run_dir.write_run(summary)
    return summary


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded row indices (train, validation); the validation part is round(n * fraction)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def library_versions() -> dict:
    import platform

    import pandas
    import pyarrow

    return {"digit_models": digit_models.__version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "tf_keras": keras.__version__, "ray": ray.__version__,
            "numpy": np.__version__, "pandas": pandas.__version__, "pyarrow": pyarrow.__version__}


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def scaling_config(config: TrainConfig) -> ray.train.ScalingConfig:
    cpus = config.cpus_per_worker or cpus_per_process(config.workers)
    resources = {"CPU": cpus}
    if config.gpus_per_worker:
        resources["GPU"] = config.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.gpus_per_worker > 0,
                                   resources_per_worker=resources)


# ---------------------------------------------------------------------------- the worker side

def train_func(loop_config: dict) -> dict:
    """Runs on every Ray Train worker; returns (from rank 0) the history and the stop reason."""
    config = TrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    configure_tensorflow(cpus, config.mixed_precision)
    _quiet_report_logging()

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    train_x, train_y, train_rows = _materialize(ray.train.get_dataset_shard("train"))
    val_x, val_y, val_rows = _materialize(ray.train.get_dataset_shard("validation"))
    shards = _shard_report(strategy, rank, world, train_rows, val_rows, loop_config["train_rows_total"])
    # Every worker must run the same number of steps, or one waits forever in an all-reduce.
    train_size, val_size = min(shards["train_rows"]), min(shards["validation_rows"])
    steps = train_size // config.batch_size
    if steps == 0:
        raise DigitsError(f"each worker has {train_size} training rows, fewer than one batch of "
                          f"{config.batch_size}; use more rows or a smaller --batch-size")
    replicas_here = strategy.num_replicas_in_sync // world
    augmentation = Augmentation() if config.augment else None
    train_data = strategy.distribute_datasets_from_function(lambda _: _batches(
        train_x[:train_size], train_y[:train_size], config.batch_size // replicas_here, cpus,
        shuffle_seed=config.seed * 1000 + rank, augmentation=augmentation))
    validation = {}
    if val_size:
        val_batch = max(config.batch_size, 256)
        validation = dict(
            validation_data=strategy.distribute_datasets_from_function(lambda _: _batches(
                val_x[:val_size], val_y[:val_size], val_batch // replicas_here, cpus)),
            validation_steps=-(-val_size // val_batch))

    state = {"epochs_done": 0, "history": [], "restarts": []}
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as directory:
                state = json.loads(Path(directory, RunDir.STATE).read_text())
                model = keras.models.load_model(Path(directory, RunDir.MODEL))
            state["restarts"].append({"resumed_after_epoch": state["epochs_done"]})
        else:
            model = build_model(config.model)
            model.compile(optimizer=keras.optimizers.Adam(learning_rate(config, steps)),
                          loss=keras.losses.CategoricalCrossentropy(
                              label_smoothing=config.label_smoothing),
                          metrics=["accuracy"], steps_per_execution=STEPS_PER_EXECUTION)

    target_stop = SynchronizedTargetStop(strategy, config.target_metric, config.target)
    report = EpochReport(rank, config, state, shards, target_stop,
                         images_per_epoch=steps * config.batch_size * world)
    if state.get("stop_reason") is None and state["epochs_done"] < config.epochs:
        model.fit(train_data, epochs=config.epochs, initial_epoch=state["epochs_done"],
                  steps_per_epoch=steps, callbacks=[target_stop, report], verbose=0, **validation)
    return {**state, "shards": shards}


def _quiet_report_logging() -> None:
    """Ray Train 2.60 logs every report() at INFO on each worker through a logger named by its
    source file, outside the `ray.train` hierarchy that RunConfig's LoggingConfig filters."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _materialize(shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads this worker's whole shard once into memory: MNIST-sized data fits many times over,
    and an in-memory tf.data pipeline is far faster per epoch than re-streaming the rows."""
    images, labels, rows = [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
        rows.append(batch["row"])
    if not rows:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.int32)
    return np.concatenate(images), np.concatenate(labels), np.concatenate(rows)


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """The constant rate, or a linear warm-up from a tenth of it (one epoch, or a tenth of the
    run if shorter: a 2-epoch run cannot spend half its steps warming up) followed by cosine
    decay to zero at the last planned step (the optimizer's step count survives restarts)."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    warmup = min(steps_per_epoch, config.epochs * steps_per_epoch // 10)
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate / 10 if warmup else config.learning_rate,
        decay_steps=config.epochs * steps_per_epoch - warmup,
        warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)


def _batches(images, labels, batch_size: int, cpus: int, shuffle_seed: int | None = None,
             augmentation: Augmentation | None = None):
    """Batches of (pixels, one-hot label); one-hot because only the categorical loss takes
    label smoothing. With a shuffle seed: reshuffled, endless training batches, augmented
    per batch from (seed, batch number) if asked."""
    data = tf.data.Dataset.from_tensor_slices((images, tf.one_hot(labels, NUM_CLASSES)))
    if shuffle_seed is None:
        data = data.batch(batch_size)
    else:
        data = data.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
        data = data.batch(batch_size, drop_remainder=True).repeat()
        if augmentation:
            def augment(step, batch):
                seed = tf.stack([tf.constant(shuffle_seed, tf.int64), step])
                return random_affine(batch[0], seed, augmentation), batch[1]
            data = data.enumerate().map(augment, num_parallel_calls=cpus)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cpus
    return data.prefetch(tf.data.AUTOTUNE).with_options(options)


def all_reduce_sum(strategy, values) -> np.ndarray:
    """Sums a float vector over every replica of every worker; all workers get the total."""
    local = tf.constant(np.asarray(values, dtype=np.float32))
    per_replica = strategy.run(lambda: tf.identity(local))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def _shard_report(strategy, rank: int, world: int, train_rows, val_rows, rows_total: int) -> dict:
    """Row counts of every worker's shards, and whether any training row reached two workers
    (one collective over a per-row count vector; with k replicas per worker counts are k-fold)."""
    replicas_here = strategy.num_replicas_in_sync // world
    counts = np.zeros(2 * world + rows_total, np.float32)
    counts[rank] = len(train_rows)
    counts[world + rank] = len(val_rows)
    counts[2 * world + train_rows] = 1
    totals = all_reduce_sum(strategy, counts) / replicas_here
    per_row = totals[2 * world:]
    return {
        "train_rows": [int(n) for n in totals[:world]],
        "validation_rows": [int(n) for n in totals[world:2 * world]],
        "train_rows_seen_by_two_workers": int((per_row > 1).sum()),
        "disjoint": bool(per_row.max(initial=0) <= 1),
    }


class SynchronizedTargetStop(keras.callbacks.Callback):
    """Stops all workers at the end of the same epoch, once every replica's metric reached the
    target. The decision is an all-reduce of the replicas' votes, so workers whose local
    metric values differ still agree."""

    def __init__(self, strategy, metric: str, target: float):
        super().__init__()
        self.strategy, self.metric, self.target = strategy, metric, target
        self.reached_at_epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.metric)
        if value is None:
            raise DigitsError(f"metric {self.metric!r} was not computed; have {sorted(logs or {})}")
        votes = all_reduce_sum(self.strategy, [float(value >= self.target)])[0]
        if votes >= self.strategy.num_replicas_in_sync:
            self.reached_at_epoch = epoch + 1
            self.model.stop_training = True


class EpochReport(keras.callbacks.Callback):
    """Per epoch: metrics and throughput into the history, a checkpoint and a report to Ray
    Train, and (rank 0) one line of progress on the console."""

    def __init__(self, rank: int, config: TrainConfig, state: dict, shards: dict,
                 target_stop: SynchronizedTargetStop, images_per_epoch: int):
        super().__init__()
        self.rank, self.config, self.state, self.shards = rank, config, state, shards
        self.target_stop, self.images_per_epoch = target_stop, images_per_epoch
        self.started = time.perf_counter() - sum(e["epoch_s"] for e in state["history"])

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()
        self.train_ended = None

    def on_test_begin(self, logs=None):
        self.train_ended = self.train_ended or time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        train_s = (self.train_ended or now) - self.epoch_started
        entry = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                 "images_per_s": self.images_per_epoch / train_s,
                 "epoch_s": now - self.epoch_started, "elapsed_s": now - self.started}
        state = self.state
        state["history"].append(entry)
        state["epochs_done"] = epoch + 1
        if self.target_stop.reached_at_epoch is not None:
            state["stop_reason"] = (f"target reached at epoch {epoch + 1} "
                                    f"({self.config.target_metric} >= {self.config.target})")
        elif epoch + 1 >= self.config.epochs:
            state["stop_reason"] = "epochs exhausted"
        # Every worker saves (the strategy expects all to take part); only rank 0's is kept.
        with tempfile.TemporaryDirectory(prefix="digits-ckpt-") as directory:
            # The format named explicitly: tf-keras keeps "use the .keras format" in a
            # thread-local that its first save resets to False in a non-main thread (Ray
            # Train's), after which a "model.keras" would silently be written as HDF5.
            self.model.save(os.path.join(directory, RunDir.MODEL), save_format="keras_v3")
            Path(directory, RunDir.STATE).write_text(json.dumps(state))
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report({**entry, "stop_reason": state.get("stop_reason")}, checkpoint=checkpoint)
        if self.rank == 0:
            # Straight to the process's stdout: Ray Train re-routes print() through logging,
            # where TensorFlow's handlers would print the line twice. Ray forwards stdout.
            sys.__stdout__.write(progress_line(entry, self.config.epochs) + "\n")
            sys.__stdout__.flush()


def progress_line(entry: dict, epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4f}")
    parts.append(f"{entry['images_per_s']:,.0f} img/s")
    parts.append(f"epoch {entry['epoch_s']:.1f}s")
    parts.append(f"elapsed {entry['elapsed_s']:.1f}s")
    return "  ".join(parts)



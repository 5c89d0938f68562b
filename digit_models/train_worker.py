"""The worker side of `digits train`: what every Ray Train worker runs (train.py is the driver).

Each worker takes its own rows of the training set from the object store (every `world`-th row
from its rank on, so no two workers share a row), keeps them in memory, and trains the
registered model under MultiWorkerMirroredStrategy: gradients are all-reduced every step, and
the global batch is the per-worker batch times the number of workers.
After every epoch each worker reports its metrics and rank 0 a checkpoint (model, optimizer
state, history) through `ray.train.report`; a restarted worker group resumes from the newest
complete one (checkpoints.py), and its rank 0 records the start (attempts.py).

The accuracy target is decided collectively: every worker votes whether its metric reached the
target, the votes are all-reduced, and all workers stop at the same epoch. A worker deciding
alone would leave `fit()` while the others wait forever in the next step's all-reduce.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from digit_models.tf_setup import configure_tensorflow, keras, tf  # before Ray Train's TensorFlow
import ray
import ray.train

from digit_models import attempts
from digit_models.augmentation import Augmentation, random_affine
from digit_models.batchnorm import RecomputedBatchNorm, batchnorm_rows
from digit_models.checkpoints import newest_complete
from digit_models.config import TrainConfig
from digit_models.console import say
from digit_models.errors import DigitsError
from digit_models.kaggle_csv import NUM_CLASSES
from digit_models.mlflow_log import EpochMetrics
from digit_models.models import build_model
from digit_models.run_dir import RunDir
from digit_models.schedule import TimeBudget, learning_rate
from digit_models.tensorboard_log import TensorBoardEvents
from digit_models.train_callbacks import (Checkpointing, EpochHistory, InjectedFault, ProgressLine,
                                          SynchronizedTargetStop, all_reduce_sum)
from digit_models.weight_average import AveragingAdam, WeightAverage

# Training steps per call from Python into TensorFlow: for the seed's small dense net the
# round trip of a call would be most of each step.
STEPS_PER_EXECUTION = 16


def run_worker(loop_config: dict) -> dict:
    """Trains this worker's share; returns (all ranks alike) the history and the stop reason."""
    timeline = {"train_func_started": time.time()}
    config = TrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    configure_tensorflow(cpus, config.precision_policy)
    _quiet_report_logging()

    strategy = multi_worker_strategy(config)
    timeline["strategy_ready"] = time.time()
    train_x, train_y, train_rows = own_rows(loop_config["train"], rank, world)
    val_x, val_y, val_rows = own_rows(loop_config["validation"], rank, world)
    shards = _shard_report(strategy, rank, world, train_rows, val_rows, loop_config["rows_total"])
    # Every worker must run the same number of steps, or one waits forever in an all-reduce.
    train_size, val_size = min(shards["train_rows"]), min(shards["validation_rows"])
    step_rows = config.batch_size * config.accumulate  # per worker and update
    steps = train_size // step_rows
    if steps == 0:
        raise DigitsError(f"each worker has {train_size} training rows, fewer than one step of "
                          f"{step_rows} (--batch-size x --accumulate); use more rows or smaller batches")
    replicas_here = strategy.num_replicas_in_sync // world
    augmentation = Augmentation() if config.augment else None
    train_data = strategy.distribute_datasets_from_function(lambda _: _batches(
        train_x[:train_size], train_y[:train_size], step_rows // replicas_here, cpus,
        shuffle_seed=config.seed * 1000 + rank, augmentation=augmentation))
    validation = {}
    if val_size:
        val_batch = max(config.batch_size, 256)
        validation = dict(
            validation_data=strategy.distribute_datasets_from_function(lambda _: _batches(
                val_x[:val_size], val_y[:val_size], val_batch // replicas_here, cpus)),
            validation_steps=-(-val_size // val_batch))

    timeline["data_ready"] = time.time()
    resumed = newest_complete(loop_config["run_dir"])
    state = resumed[0] if resumed else {"epochs_done": 0, "history": []}
    with strategy.scope():
        if resumed:
            with tempfile.TemporaryDirectory(prefix="digits-resume-") as directory:
                Path(directory, RunDir.MODEL).write_bytes(resumed[1])
                model = keras.models.load_model(Path(directory, RunDir.MODEL))
        else:
            model = compiled_model(config, steps)
    if rank == 0:
        record_start(loop_config, world, state["epochs_done"] if resumed else None)

    if strategy.num_replicas_in_sync > 1 or config.accumulate > 1:
        model.train_step = types.MethodType(data_parallel_step(
            getattr(tf, config.gradient_dtype), config.accumulate), model)
    timeline["model_ready"] = time.time()
    target_stop = SynchronizedTargetStop(strategy, config.target_metric, config.target)
    images_per_epoch = steps * step_rows * world
    fault = loop_config["faults"] and InjectedFault(loop_config["faults"], rank, steps, loop_config["run_dir"])
    callbacks = [*([WeightAverage()] if config.weight_average else []),  # before all that reads weights
                 *([RecomputedBatchNorm(strategy, train_x[batchnorm_rows(train_size, world, config.seed)])]
                   if config.recompute_batchnorm else []),
                 target_stop,
                 EpochHistory(config, state, target_stop, images_per_epoch, timeline=timeline),
                 *([TimeBudget(strategy, config, state, steps, images_per_epoch, rank, world,
                               loop_config["command_started_unix"],
                               resumed=loop_config["driver_session"] > 0)] if config.time_budget else []),
                 Checkpointing(rank, state, before_report=fault and fault.checkpoint_written),
                 *(rank_zero_logs(config, loop_config, state, steps) if rank == 0 else []),
                 *([fault] if fault else [])]
    if state.get("stop_reason") is None and state["epochs_done"] < config.epochs:
        model.fit(train_data, epochs=config.epochs, initial_epoch=state["epochs_done"],
                  steps_per_epoch=steps, callbacks=callbacks, verbose=0, **validation)
    timeline["train_func_ended"] = time.time()
    return {**state, "shards": shards, "timeline": timeline,
            "worker_process": {"cpus": cpus, "niceness": os.nice(0),
                               "precision": keras.mixed_precision.global_policy().name}}


def compiled_model(config: TrainConfig, steps: int) -> keras.Model:
    """A fresh model with its optimizer, loss and metrics (under a strategy: inside its scope).
    With a weight average the optimizer is built at once, so that its average exists before
    the first epoch (WeightAverage swaps it in and out from then on)."""
    model = build_model(config.model, config.dropout)
    rate = learning_rate(config, steps)
    optimizer = (AveragingAdam(rate, ema_momentum=config.weight_average) if config.weight_average
                 else keras.optimizers.Adam(rate))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=["accuracy"], steps_per_execution=STEPS_PER_EXECUTION)
    if config.weight_average:
        model.optimizer.build(model.trainable_variables)
    return model


def record_start(loop_config: dict, world: int, resumed_after: int | None) -> None:
    """Rank 0: this worker group's start on record, and on the console when it is a restart."""
    session = loop_config["driver_session"]
    restarts = sum(entry["driver_session"] == session
                   for entry in attempts.recorded(loop_config["run_dir"], "start"))
    attempts.record(loop_config["run_dir"], "start", {
        "driver_session": session, "workers": world, "resumed_after_epoch": resumed_after})
    where = f"after epoch {resumed_after}" if resumed_after is not None else "from scratch"
    if restarts:
        say(f"workers restarted after a failure (restart {restarts} of this run), resuming {where}")
    elif session:
        say(f"resuming {where}")


def rank_zero_logs(config: TrainConfig, loop_config: dict, state: dict,
                   steps: int) -> list[keras.callbacks.Callback]:
    """The console line, TensorBoard's event file and MLflow's metrics: once per run, from
    rank 0, after the epoch's checkpoint (so they show what a restart continues from)."""
    logs = [ProgressLine(config.epochs, steps, state), TensorBoardEvents(loop_config["run_dir"], state)]
    if config.mlflow:
        metrics = EpochMetrics(config.mlflow, loop_config["mlflow_run_id"])
        logs.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: metrics.log(state["history"])))
    return logs


def multi_worker_strategy(config: TrainConfig) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy without TensorFlow's own peer health check. Ray Train
    watches the workers (and restarts the group when one dies); TensorFlow's check pings the
    peers from a thread that sleeps 30 s between rounds and that the strategy's destructor
    joins, so every multi-worker run's end waited out the rest of that sleep."""
    from tensorflow.python.distribute import collective_all_reduce_strategy

    collective_all_reduce_strategy.CollectiveAllReduceExtended._enable_check_health = False
    _device_input_without_autotuning()
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication(config))


def _device_input_without_autotuning() -> None:
    """The strategy feeds each device through a tf.data pipeline of its own (a
    MultiDeviceIterator's), built with TensorFlow's default options, which autotune; turned off
    here for the reason in `_untuned_options`. TensorFlow has no setting for it, so its builder
    of those pipelines is wrapped (once per process)."""
    from tensorflow.python.data.ops import multi_device_iterator_ops

    build = multi_device_iterator_ops._create_device_dataset
    if getattr(build, "autotuning_off", False):
        return

    def without_autotuning(*args, **kwargs):
        return build(*args, **kwargs).with_options(_untuned_options())

    without_autotuning.autotuning_off = True
    multi_device_iterator_ops._create_device_dataset = without_autotuning


def _untuned_options(cpus: int | None = None) -> tf.data.Options:
    """tf.data options without autotuning. An autotuned pipeline's iterator, when destroyed,
    waits for its tuning thread to wake from a sleep that grows to a minute, so fit() could
    return long after its last epoch, as it dropped its iterators. The parallelism here is
    fixed (the map's calls, the thread pool) or sizes itself (prefetch's buffer) untuned."""
    options = tf.data.Options()
    options.autotune.enabled = False
    if cpus:
        options.threading.private_threadpool_size = cpus
    return options


def communication(config: TrainConfig) -> tf.distribute.experimental.CommunicationOptions:
    """The collective implementation, chosen rather than left to TensorFlow: NCCL between GPUs,
    ring all-reduce over gRPC between CPUs."""
    implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL
                      if config.gpus_per_worker else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.experimental.CommunicationOptions(implementation=implementation)


def data_parallel_step(all_reduce_dtype, micro_batches: int = 1):
    """Keras's train step for a worker of several, with fewer bytes and fewer collectives per
    image: the gradients of `micro_batches` slices of the batch are summed locally, then once
    across workers in `all_reduce_dtype` (the weights and their update stay float32). Set on
    the model instance, so the model file stays Keras's own."""

    def gradients(model, x, y):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred) / micro_batches
        model.compiled_metrics.update_state(y, y_pred)
        return [g for g, _ in model.optimizer.compute_gradients(loss, model.trainable_variables, tape)]

    def train_step(model, data):
        x, y = data
        if micro_batches == 1:
            total = gradients(model, x, y)
        else:
            parts = zip(tf.split(x, micro_batches), tf.split(y, micro_batches))
            total = gradients(model, *next(parts))
            for part_x, part_y in parts:
                total = [t + g for t, g in zip(total, gradients(model, part_x, part_y))]
        summed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.cast(g, all_reduce_dtype) for g in total])
        model.optimizer.apply_gradients(
            [(tf.cast(g, v.dtype), v) for g, v in zip(summed, model.trainable_variables)],
            skip_gradients_aggregation=True)
        return model.get_metrics_result()

    return train_step


def own_rows(arrays: dict, rank: int, world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This worker's rows (every world-th, from its rank on) of the images, labels and row
    numbers the driver put into the object store."""
    images, labels, rows = ray.get([arrays["images"], arrays["labels"], arrays["rows"]])
    return images[rank::world], labels[rank::world], rows[rank::world]


def _quiet_report_logging() -> None:
    """Ray Train 2.60 logs every report() at INFO on each worker through a logger named by its
    source file, outside the `ray.train` hierarchy that RunConfig's LoggingConfig filters."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


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
    return data.prefetch(tf.data.AUTOTUNE).with_options(_untuned_options(cpus))


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

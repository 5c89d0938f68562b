"""The worker side of `digits train`: what every Ray Train worker runs (training/driver.py is the driver).

Each worker fetches the whole training set from the object store and keeps it in memory; each
epoch visits the rows in a seeded order of its own (EpochOrder), and each step every worker
trains on its own slice of that step's rows, so no two workers share a row in an epoch.
Validation rows are fetched whole too, and each worker keeps every `world`-th from its rank on.
The registered model trains under MultiWorkerMirroredStrategy: gradients are all-reduced every
step, and the global batch is the per-worker batch times the number of workers (times
--accumulate).
After every epoch each worker reports its metrics and rank 0 a checkpoint (model, optimizer
state, history) through `ray.train.report`; a restarted worker group resumes from the newest
complete one (training/checkpoints.py), and its rank 0 records the start (training/attempts.py).

The accuracy target is decided collectively: every worker votes whether its metric reached the
target, the votes are all-reduced, and all workers stop at the same epoch. A worker deciding
alone would leave `fit()` while the others wait forever in the next step's all-reduce.
"""

from __future__ import annotations

import json
import logging
import os
import time
import types
from contextlib import nullcontext

import numpy as np

from digit_models.runtime.tf_setup import configure_tensorflow, keras, tf  # before Ray Train's TensorFlow
import ray
import ray.train

from digit_models.runtime import seams
from digit_models.training import attempts
from digit_models.nets.augmentation import Augmentation, random_affine
from digit_models.training.batchnorm import RecomputedBatchNorm, batchnorm_rows
from digit_models.training.checkpoints import load_with_optimizer, newest_complete
from digit_models.config import TrainConfig
from digit_models.runtime.console import say
from digit_models.runtime.cpu_features import require_bfloat16_cpu, this_cpu_has_bfloat16
from digit_models.errors import DigitsError
from digit_models.storage.kaggle_csv import NUM_CLASSES
from digit_models.training.handoff import Shares, TrainingState, WorkerInputs, WorkerOutcome
from digit_models.training.mlflow_log import EpochMetrics
from digit_models.nets.models import build_model
from digit_models.storage.run_dir import RunDir
from digit_models.training.schedule import TimeBudget, learning_rate
from digit_models.training.tensorboard_log import StepProfile, TensorBoardEvents
from digit_models.training.callbacks import (
    Checkpointing,
    EpochHistory,
    InjectedFault,
    PreemptionNotice,
    ProgressLine,
    SynchronizedTargetStop,
    sum_over_workers,
)
from digit_models.training.weight_average import AveragingAdam, WeightAverage

# Training steps per call from Python into TensorFlow: for the seed's small dense net the
# round trip of a call would be most of each step.
STEPS_PER_EXECUTION = 16


def run_worker(inputs: WorkerInputs) -> WorkerOutcome:
    """Trains this worker's slice of every step; returns (all ranks alike) the training state
    and the worker group's own record."""
    timeline = {"train_func_started": time.time()}
    config = inputs.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    configure_tensorflow(cpus)
    _quiet_report_logging()

    strategy = multi_worker_strategy(config)
    keras.mixed_precision.set_global_policy(agreed_policy(strategy, config, world))
    timeline["strategy_ready"] = time.time()
    train_x, train_y = joined(inputs.train.images), np.concatenate(ray.get(inputs.train.labels))
    val_x, val_y, val_rows = own_rows(inputs.validation, rank, world)
    order = EpochOrder(len(train_x), config.global_batch(world), rank, world, config.seed)
    if order.steps == 0:
        raise DigitsError(
            f"{len(train_x)} training rows are fewer than one step of {world} worker(s) "
            f"x --batch-size x --accumulate ({order.global_batch}); use more rows or "
            "smaller batches"
        )
    shards = _shard_report(strategy, rank, world, order, val_rows, inputs.rows_total)
    # Every worker must run the same number of steps, or one waits forever in an all-reduce.
    val_size = min(shards["validation_rows"])
    replicas_here = strategy.num_replicas_in_sync // world
    augmentation = Augmentation() if config.augment else None
    validation = {}
    if val_size:
        val_batch = max(config.batch_size, 256)
        validation = dict(
            validation_data=strategy.distribute_datasets_from_function(
                lambda _: _batches(val_x[:val_size], val_y[:val_size], val_batch // replicas_here, cpus)
            ),
            validation_steps=-(-val_size // val_batch),
        )

    timeline["data_ready"] = time.time()
    resumed = newest_complete(inputs.run_dir)
    state = resumed.state if resumed else TrainingState()
    in_epoch = resumed and resumed.in_epoch  # a checkpoint taken mid-epoch, on a preemption notice
    with strategy.scope():
        model = compiled_model(config, order.steps, world, state.epochs_planned(config.epochs))
        if resumed:
            restore(
                model,
                resumed.model_file,
                RunDir(inputs.run_dir).child(RunDir.CHECKPOINTS),
                global_batch_then=state.global_batch or order.global_batch,
                global_batch_now=order.global_batch,
            )
    state.global_batch = order.global_batch
    if rank == 0:
        record_start(
            inputs,
            world,
            config.workers,
            state.epochs_done if resumed else None,
            in_epoch["images_done"] if in_epoch else 0,
        )

    use_data_parallel_step(model, strategy, config)
    timeline["model_ready"] = time.time()
    target_stop = SynchronizedTargetStop(strategy, config.target_metric, config.target)
    images_per_epoch = order.steps * order.global_batch
    fault = inputs.faults and InjectedFault(inputs.faults, rank, order.steps, inputs.run_dir, strategy)
    weight_average = WeightAverage() if config.weight_average else None
    checkpointing = Checkpointing(
        rank,
        state,
        before_report=fault and fault.checkpoint_written,
        epoch_layout=weight_average.average_in if weight_average else nullcontext,
    )
    preemption = PreemptionNotice(strategy, checkpointing, order.global_batch, rank, inputs.run_dir)
    callbacks = [
        *([weight_average] if weight_average else []),  # before all that reads weights
        *(
            [RecomputedBatchNorm(strategy, world, train_x[batchnorm_rows(len(train_x), rank, world, config.seed)])]
            if config.recompute_batchnorm
            else []
        ),
        target_stop,
        EpochHistory(config, state, target_stop, images_per_epoch, timeline=timeline),
        *(
            [
                TimeBudget(
                    strategy,
                    config,
                    state,
                    order.steps,
                    images_per_epoch,
                    rank,
                    world,
                    inputs.command_started_unix,
                    resumed=inputs.driver_session > 0,
                )
            ]
            if config.time_budget
            else []
        ),
        checkpointing,
        *(rank_zero_logs(inputs, state, order.steps) if rank == 0 else []),
        *([fault] if fault else []),
        *(
            [StepProfile(inputs.run_dir, *config.profile_steps, rank, inputs.command_started_unix, STEPS_PER_EXECUTION)]
            if config.profile_steps
            else []
        ),
        preemption,
    ]  # last: a just-in-time checkpoint holds the step's own records

    def train(first_epoch: int, epochs: int, start: int = 0) -> None:
        """fit() over epochs [first_epoch, epochs), the first from image `start` of its order."""
        steps = order.steps_from(start)
        preemption.epoch_start = start
        data = strategy.distribute_datasets_from_function(
            lambda _: order.batches(train_x, train_y, first_epoch, start, replicas_here, cpus, augmentation)
        )
        model.fit(
            data,
            epochs=epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=0,
            **validation,
        )

    def more_to_do() -> bool:
        return state.stop_reason is None and state.epochs_done < config.epochs

    if in_epoch and more_to_do():  # the rest of the epoch the checkpoint was taken in
        train(state.epochs_done, state.epochs_done + 1, start=in_epoch["images_done"])
    if more_to_do():
        train(state.epochs_done, config.epochs)
    timeline["train_func_ended"] = time.time()
    return WorkerOutcome(
        state=state,
        workers=world,
        shards=shards,
        timeline=timeline,
        preemption_checks=preemption.cost,
        worker_process={"cpus": cpus, "niceness": os.nice(0), "precision": keras.mixed_precision.global_policy().name},
    )


class EpochOrder:
    """Which training rows each step of each epoch trains on, the same for any number of
    workers: epoch e visits the rows in a seeded permutation of its own (computed per index,
    never stored), global step s takes the permutation's next `global_batch` positions, and
    worker `rank` its own `step_rows` of them. A run resumed at any image of an epoch, by any
    number of workers, so trains on exactly the images that epoch had left."""

    def __init__(self, rows: int, global_batch: int, rank: int, world: int, seed: int):
        self.rows, self.global_batch, self.rank, self.seed = rows, global_batch, rank, seed
        self.step_rows = global_batch // world
        self.steps = rows // global_batch

    def steps_from(self, start: int) -> int:
        """The steps left in an epoch from image `start`: at least one, which wraps around to
        the epoch's first images (a group grown mid-epoch may find less than a global batch)."""
        return max(1, (self.rows - start) // self.global_batch)

    def rows_of(self, epoch: int, step: int | tf.Tensor, start: int | tf.Tensor = 0) -> tf.Tensor:
        first = tf.cast(start, tf.int64) + tf.cast(step, tf.int64) * self.global_batch + self.rank * self.step_rows
        positions = (first + tf.range(self.step_rows, dtype=tf.int64)) % self.rows
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)])
        return tf.random.experimental.index_shuffle(positions, seed, self.rows - 1)

    def batches(
        self,
        images,
        labels,
        first_epoch: int,
        start: int,
        replicas: int,
        cpus: int,
        augmentation: Augmentation | None = None,
    ):
        """Endless (pixels, one-hot label) batches from epoch `first_epoch`'s image `start` on,
        each worker step split between this worker's `replicas`; augmented, if asked, from
        (seed, epoch, position): the same images get the same views on resume."""
        images, labels = tensor_sharing(images), tf.one_hot(labels, NUM_CLASSES)
        first_steps = self.steps_from(start)

        def batch(index):
            later = index >= first_steps  # past the first (perhaps partial) epoch
            past = tf.maximum(index - first_steps, 0)
            epoch = tf.where(later, first_epoch + 1 + past // self.steps, tf.constant(first_epoch, tf.int64))
            step = tf.where(later, past % self.steps, index)
            offset = tf.where(later, tf.constant(0, tf.int64), tf.constant(start, tf.int64))
            rows = self.rows_of(epoch, step, offset)
            x, y = tf.gather(images, rows), tf.gather(labels, rows)
            if augmentation:
                where = epoch * self.rows + offset + step * self.global_batch
                x = random_affine(
                    x, tf.stack([tf.constant(self.seed * 1000 + self.rank, tf.int64), where]), augmentation
                )
            return x, y

        # Infinite, not merely long: over a finite input the strategy's iterator all-reduces,
        # every step, whether any worker's input has run out (every worker's has as many steps)
        data = tf.data.Dataset.counter().map(batch, num_parallel_calls=cpus)
        if replicas > 1:
            data = data.unbatch().batch(self.step_rows // replicas)
        return data.prefetch(tf.data.AUTOTUNE).with_options(_untuned_options(cpus))


def restore(model: keras.Model, model_file: bytes, where: str, global_batch_then: int, global_batch_now: int) -> None:
    """A checkpoint's weights and optimizer state into `model`, compiled for this worker group
    (the checkpoint's file checked first: nets/model_file.py). A group of another size takes more
    or fewer images per update, so the optimizer's step count, which the learning-rate
    schedule reads, is rescaled to the images trained."""
    saved = load_with_optimizer(model_file, f"{where}: the newest complete checkpoint's {RunDir.MODEL}")
    model.set_weights(saved.get_weights())
    model.optimizer.build(model.trainable_variables)
    for variable, value in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        variable.assign(value)
    model.optimizer.iterations.assign(int(saved.optimizer.iterations.numpy()) * global_batch_then // global_batch_now)


def compiled_model(config: TrainConfig, steps: int, workers: int, epochs: int) -> keras.Model:
    """A fresh model with its optimizer, loss and metrics, for a group of `workers` taking
    `steps` per epoch over `epochs` (under a strategy: inside its scope); with --sync-every K
    its optimizer updates K times a step. With a weight
    average the optimizer is built at once, so that its average exists before the first epoch
    (WeightAverage swaps it in and out from then on)."""
    model = build_model(config.model, config.dropout)
    rate = learning_rate(config, steps * config.sync_every, workers, epochs)
    optimizer = (
        AveragingAdam(rate, ema_momentum=config.weight_average)
        if config.weight_average
        else keras.optimizers.Adam(rate)
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    if config.weight_average:
        model.optimizer.build(model.trainable_variables)
    return model


def record_start(inputs: WorkerInputs, world: int, most: int, resumed_after: int | None, images_done: int) -> None:
    """Rank 0: this worker group's start on record, and on the console when it is a restart
    (with the group's size when it is not the run's full size)."""
    session = inputs.driver_session
    history = attempts.timeline(inputs.run_dir)
    starts = [entry for _, kind, entry in history if kind == "start" and entry["driver_session"] == session]
    ended = [entry for _, kind, entry in history if kind == "restart"]
    attempts.record(
        inputs.run_dir,
        "start",
        {
            "driver_session": session,
            "workers": world,
            "resumed_after_epoch": resumed_after,
            "resumed_at_image": images_done,
        },
    )
    where = f"after epoch {resumed_after}" if resumed_after is not None else "from scratch"
    if images_done:
        where = f"in epoch {resumed_after + 1} at image {images_done:,}"
    size = f" with {world} of {most} workers" if world != most else ""
    if starts:
        why = {"preemption": "a preemption", "resize": "a resize"}.get(ended[-1]["why"] if ended else "", "a failure")
        say(f"workers restarted after {why} (restart {len(starts)} of this run), resuming {where}{size}")
    elif session:
        say(f"resuming {where}{size}")


def rank_zero_logs(inputs: WorkerInputs, state: TrainingState, steps: int) -> list[keras.callbacks.Callback]:
    """The console line, TensorBoard's event file and MLflow's metrics: once per run, from
    rank 0, after the epoch's checkpoint (so they show what a restart continues from)."""
    config = inputs.config
    logs = [ProgressLine(config.epochs, steps, state), TensorBoardEvents(inputs.run_dir, state)]
    if config.mlflow:
        metrics = EpochMetrics(config.mlflow, inputs.mlflow_run_id)
        logs.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: metrics.log(state.history)))
    return logs


def multi_worker_strategy(config: TrainConfig) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy without TensorFlow's own peer health check. Ray Train
    watches the workers (and restarts the group when one dies); TensorFlow's check pings the
    peers from a thread that sleeps 30 s between rounds and that the strategy's destructor
    joins, so every multi-worker run's end waited out the rest of that sleep.
    Across the workers of TF_CONFIG (training/backend.py), through a gRPC server on every
    interface; in a group of one, which gets no TF_CONFIG, on this worker's own devices, with
    no server."""
    seams.replace(seams.CHECK_HEALTH, False)
    _device_input_without_autotuning()
    if "TF_CONFIG" in os.environ:
        _coordination_tolerating_stalls(len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]))
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication(config))


# How long a peer may send TensorFlow no heartbeat before the group is aborted.
PEER_SILENCE_S = 60


def _coordination_tolerating_stalls(workers: int) -> None:
    """The coordination service the strategy would start, with a heartbeat timeout of
    PEER_SILENCE_S in place of TensorFlow's 10 s. A worker that dies, or whose node does, is
    found by Ray, which restarts the group; a heartbeat stops only while the whole process is
    frozen (a loaded or swapping machine, a paused VM), and at 10 s one such pause of a worker
    cost the group a restart, spent from --max-failures, although the worker would go on."""
    seams.borrow(seams.COORDINATION_SERVICE)().configure_coordination_service(
        service_type="standalone",
        service_leader="/job:worker/replica:0/task:0",
        heartbeat_timeout_in_ms=PEER_SILENCE_S * 1000,
        coordinated_jobs=[seams.borrow(seams.COORDINATED_JOB)(name="worker", num_tasks=workers)],
    )


def _device_input_without_autotuning() -> None:
    """The strategy feeds each device through a tf.data pipeline of its own (a
    MultiDeviceIterator's), built with TensorFlow's default options, which autotune; turned off
    here for the reason in `_untuned_options`. TensorFlow has no setting for it, so its builder
    of those pipelines is wrapped (once per process)."""
    build = seams.borrow(seams.DEVICE_DATASET)
    if getattr(build, "autotuning_off", False):
        return

    def without_autotuning(*args, **kwargs):
        return build(*args, **kwargs).with_options(_untuned_options())

    without_autotuning.autotuning_off = True
    seams.replace(seams.DEVICE_DATASET, without_autotuning)


def _untuned_options(cpus: int | None = None) -> tf.data.Options:
    """tf.data options without autotuning or graph rewrites. An autotuned pipeline's iterator,
    when destroyed, waits for its tuning thread to wake from a sleep that grows to a minute, so
    fit() could return long after its last epoch, as it dropped its iterators. The parallelism
    here is fixed (the map's calls, the thread pool) or sizes itself (prefetch's buffer)
    untuned. The default rewrites serialize the pipeline's graph with the tensors it captures,
    and keep that copy of every training row; the pipelines here have nothing for them to fuse."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    if cpus:
        options.threading.private_threadpool_size = cpus
    return options


def communication(config: TrainConfig) -> tf.distribute.experimental.CommunicationOptions:
    """The collective implementation, chosen rather than left to TensorFlow: NCCL between GPUs,
    ring all-reduce over gRPC between CPUs."""
    implementation = (
        tf.distribute.experimental.CommunicationImplementation.NCCL
        if config.gpus_per_worker
        else tf.distribute.experimental.CommunicationImplementation.RING
    )
    return tf.distribute.experimental.CommunicationOptions(implementation=implementation)


def agreed_policy(strategy, config: TrainConfig, world: int) -> str:
    """The dtype policy this worker computes in (TrainConfig.compute_policy for its CPU), the
    same on every worker: under `auto` on CPUs, bfloat16 only where every worker's CPU has it,
    as a group whose workers computed each their slice of a step in another precision would
    not be the data-parallel step of one model. bfloat16 asked for by name is refused on a CPU
    without it."""
    has_bfloat16 = this_cpu_has_bfloat16()
    policy = config.compute_policy(has_bfloat16)
    if config.gpus_per_worker:
        return policy
    if config.precision == "bfloat16":
        require_bfloat16_cpu()
    if config.precision == "auto" and world > 1:
        mine = np.array([policy == "mixed_bfloat16"], dtype=np.float32)
        policy = "mixed_bfloat16" if sum_over_workers(strategy, mine, world)[0] == world else "float32"
    return policy


def use_data_parallel_step(
    model: keras.Model, strategy: tf.distribute.MultiWorkerMirroredStrategy, config: TrainConfig
) -> None:
    """Keras' own step where it is the same: one replica, one batch."""
    seams.borrow(seams.EPOCH_LOGS_FROM_METRICS)  # what makes the steps' own metrics enough
    # A step's values as this worker has them, not summed across workers after every step
    model.distribute_reduction_method = "first"
    if config.sync_every > 1:
        model.train_step = types.MethodType(local_steps(config.sync_every, strategy.num_replicas_in_sync), model)
    elif strategy.num_replicas_in_sync > 1 or config.accumulate > 1:
        model.train_step = types.MethodType(
            data_parallel_step(getattr(tf, config.gradient_dtype), config.accumulate), model
        )


def data_parallel_step(all_reduce_dtype, micro_batches: int = 1):
    """Keras's train step for a worker of several, with fewer bytes and fewer collectives per
    image: the gradients of `micro_batches` slices of the batch are summed locally, then once
    across workers in `all_reduce_dtype` (the weights and their update stay float32). Set on
    the model instance, so the model file stays Keras's own."""

    def train_step(model, data):
        x, y = data
        if micro_batches == 1:
            total = _gradients(model, x, y, 1.0)
        else:
            parts = zip(tf.split(x, micro_batches), tf.split(y, micro_batches))
            total = _gradients(model, *next(parts), 1 / micro_batches)
            for part_x, part_y in parts:
                total = [t + g for t, g in zip(total, _gradients(model, part_x, part_y, 1 / micro_batches))]
        summed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.cast(g, all_reduce_dtype) for g in total]
        )
        model.optimizer.apply_gradients(
            [(tf.cast(g, v.dtype), v) for g, v in zip(summed, model.trainable_variables)],
            skip_gradients_aggregation=True,
        )
        return own_metrics(model)

    return train_step


def local_steps(batches: int, replicas: int):
    """Keras's train step for --sync-every: each worker updates its own copy of the weights
    with the gradients of `batches` slices of the batch, one after another, as a worker alone
    would; then the workers' weights are averaged, in float32: one all-reduce of the weights
    per `batches` updates instead of one of the gradients per update, and every step ends with
    the same weights on every worker. Each worker's optimizer state stays its own."""

    def train_step(model, data):
        x, y = data
        for part_x, part_y in zip(tf.split(x, batches), tf.split(y, batches)):
            # Keras divides each replica's loss by the replicas, for a sum across them
            gradients = _gradients(model, part_x, part_y, replicas)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables), skip_gradients_aggregation=True)
        if replicas > 1:
            weights = model.trainable_variables
            summed = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, [tf.identity(weight) for weight in weights]
            )
            tf.distribute.get_replica_context().merge_call(
                _assign_all, args=([total / replicas for total in summed], weights)
            )
        return own_metrics(model)

    return train_step


def own_metrics(model) -> dict:
    """This worker's own running metrics (each a mean), for a step to return. Keras's
    `get_metrics_result()` would sum every metric's state across the workers: an all-reduce
    per number, every step, each a round trip between the workers. fit() replaces a step's
    values with the metrics over every worker at the epoch's end, which is where they are
    read (seams.EPOCH_LOGS_FROM_METRICS)."""
    # Each is a Keras mean metric: its running sum and count (seams.MEAN_METRIC_STATE)
    return {metric.name: tf.math.divide_no_nan(metric.total, metric.count) for metric in model.metrics}


def _gradients(model, x, y, scale: float) -> list:
    """The gradients of Keras's loss on (x, y) times `scale`; the metrics updated."""
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred) * scale
    model.compiled_metrics.update_state(y, y_pred)
    return [g for g, _ in model.optimizer.compute_gradients(loss, model.trainable_variables, tape)]


def _assign_all(strategy, values, variables) -> None:
    for value, variable in zip(values, variables):
        strategy.extended.update(variable, lambda held, new: held.assign(new), args=(value,), group=False)


def own_rows(shares: Shares, rank: int, world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This worker's rows (every world-th, from its rank on) of the images, labels and row
    numbers the driver put into the object store, taken chunk by chunk."""
    images, labels, before = [], [], 0
    for image_part, label_part in zip(ray.get(shares.images), ray.get(shares.labels), strict=True):
        first = (rank - before) % world
        images.append(image_part[first::world])
        labels.append(label_part[first::world])
        before += len(image_part)
    return np.concatenate(images), np.concatenate(labels), ray.get(shares.rows)[rank::world]


# TensorFlow's kernels read a tensor's memory only at this alignment (EIGEN_MAX_ALIGN_BYTES).
TENSOR_ALIGNMENT = 64


def joined(parts: list) -> np.ndarray:
    """The arrays of these ObjectRefs, one after another, in one buffer that a tensor can share
    (tensor_sharing): every worker holds every training row once."""
    arrays = ray.get(parts)
    whole = aligned_empty((sum(len(array) for array in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
    return np.concatenate(arrays, out=whole)


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + TENSOR_ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[skip : skip + size].view(dtype).reshape(shape)


def tensor_sharing(array: np.ndarray) -> tf.Tensor:
    """`array` as a tensor over its own memory, through DLPack (tf.constant would copy it);
    copied once into an aligned buffer first if TensorFlow cannot read it where it is."""
    if not (array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % TENSOR_ALIGNMENT == 0):
        copy = aligned_empty(array.shape, array.dtype)
        copy[...] = array
        array = copy
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def _quiet_report_logging() -> None:
    """Ray Train 2.60 logs every report() at INFO on each worker through a logger named by its
    source file, outside the `ray.train` hierarchy that RunConfig's LoggingConfig filters."""
    logging.getLogger(seams.borrow(seams.TRAIN_CONTEXT).__file__).setLevel(logging.WARNING)


def _batches(images, labels, batch_size: int, cpus: int):
    """Validation batches of (pixels, one-hot label); one-hot because only the categorical
    loss takes label smoothing."""
    data = tf.data.Dataset.from_tensor_slices((images, tf.one_hot(labels, NUM_CLASSES))).batch(batch_size)
    return data.prefetch(tf.data.AUTOTUNE).with_options(_untuned_options(cpus))


def _shard_report(strategy, rank: int, world: int, order: EpochOrder, val_rows, rows_total: int) -> dict:
    """Row counts of every worker's share of an epoch (the first one's) and of the validation
    set, and whether any training row reached two workers (one collective over a per-row
    count vector)."""
    epoch_rows = tf.concat([order.rows_of(0, step) for step in range(order.steps)], 0).numpy()
    counts = np.zeros(2 * world + rows_total, np.float32)
    counts[rank] = len(epoch_rows)
    counts[world + rank] = len(val_rows)
    np.add.at(counts, 2 * world + epoch_rows, 1)
    totals = sum_over_workers(strategy, counts, world)
    per_row = totals[2 * world :]
    return {
        "train_rows": [int(n) for n in totals[:world]],
        "validation_rows": [int(n) for n in totals[world : 2 * world]],
        "train_rows_seen_by_two_workers": int((per_row > 1).sum()),
        "disjoint": bool(per_row.max(initial=0) <= 1),
    }

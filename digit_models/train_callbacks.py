"""What a training worker does at each epoch's end (train_worker.py puts them in fit()): the
collective stop at the accuracy target, the run's history and stop reason, the checkpoint
reported to Ray Train, and rank 0's progress line."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from digit_models.tf_setup import keras, tf  # before Ray Train's TensorFlow
import ray.train

from digit_models.config import TrainConfig
from digit_models.errors import DigitsError
from digit_models.run_dir import RunDir


def all_reduce_sum(strategy, values) -> np.ndarray:
    """Sums a float vector over every replica of every worker; all workers get the total."""
    local = tf.constant(np.asarray(values, dtype=np.float32))
    per_replica = strategy.run(lambda: tf.identity(local))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()



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


class EpochHistory(keras.callbacks.Callback):
    """Per epoch: metrics, throughput and times into the run's history, and whether and why
    training stops (decided here, once, for the checkpoint and the record)."""

    def __init__(self, config: TrainConfig, state: dict, target_stop: SynchronizedTargetStop,
                 images_per_epoch: int, timeline: dict):
        super().__init__()
        self.config, self.state, self.target_stop = config, state, target_stop
        self.images_per_epoch, self.timeline = images_per_epoch, timeline
        self.started = time.perf_counter() - sum(e["epoch_s"] for e in state["history"])

    def on_train_batch_begin(self, batch, logs=None):
        self.timeline.setdefault("first_step", time.time())

    def on_train_end(self, logs=None):
        self.timeline["training_ended"] = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()
        self.train_ended = None

    def on_test_begin(self, logs=None):
        self.train_ended = self.train_ended or time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        train_s = (self.train_ended or now) - self.epoch_started
        self.state["history"].append({
            "epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
            "images_per_s": self.images_per_epoch / train_s,
            "learning_rate": float(keras.backend.get_value(self.model.optimizer.learning_rate)),
            "epoch_s": now - self.epoch_started, "elapsed_s": now - self.started,
            "ended_unix": time.time()})
        self.state["epochs_done"] = epoch + 1
        if self.target_stop.reached_at_epoch is not None:
            self.state["stop_reason"] = (f"target reached at epoch {epoch + 1} "
                                         f"({self.config.target_metric} >= {self.config.target})")
        elif epoch + 1 >= self.config.epochs:
            self.state["stop_reason"] = "epochs exhausted"


class Checkpointing(keras.callbacks.Callback):
    """Per epoch: model, optimizer state and the run's state into a checkpoint, reported to
    Ray Train with the epoch's metrics. Every worker saves (the strategy expects all to take
    part); only rank 0's is kept."""

    def __init__(self, rank: int, state: dict):
        super().__init__()
        self.rank, self.state = rank, state

    def on_epoch_end(self, epoch, logs=None):
        with tempfile.TemporaryDirectory(prefix="digits-ckpt-") as directory:
            # The format named explicitly: tf-keras keeps "use the .keras format" in a
            # thread-local that its first save resets to False in a non-main thread (Ray
            # Train's), after which a "model.keras" would silently be written as HDF5.
            self.model.save(os.path.join(directory, RunDir.MODEL), save_format="keras_v3")
            Path(directory, RunDir.STATE).write_text(json.dumps(self.state))
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report({**self.state["history"][-1], "stop_reason": self.state.get("stop_reason")},
                             checkpoint=checkpoint)


class ProgressLine(keras.callbacks.Callback):
    """One line per epoch on the console (rank 0's)."""

    def __init__(self, epochs: int, state: dict):
        super().__init__()
        self.epochs, self.state = epochs, state

    def on_epoch_end(self, epoch, logs=None):
        # Straight to the process's stdout: Ray Train re-routes print() through logging, where
        # TensorFlow's handlers would print the line twice. Ray forwards stdout.
        sys.__stdout__.write(progress_line(self.state["history"][-1], self.epochs) + "\n")
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

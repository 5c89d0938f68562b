"""What a training worker does at each epoch's end (training/worker.py puts them in fit()): the
collective stop at the accuracy target, the run's history and stop reason, the checkpoint
reported to Ray Train, and rank 0's progress on the console."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import tempfile
import time
from contextlib import nullcontext

import numpy as np

from digit_models.runtime.tf_setup import keras, tf  # before Ray Train's TensorFlow
import ray.train

from digit_models.training import attempts
from digit_models.training.checkpoints import write_checkpoint
from digit_models.training.handoff import MODEL_SCORE, UNVALIDATED, TrainingState
from digit_models.config import TrainConfig
from digit_models.runtime.console import report_progress, say
from digit_models.errors import DigitsError


def all_reduce_sum(strategy, values) -> np.ndarray:
    """Sums a float vector over every replica of every worker; all workers get the total."""
    local = tf.constant(np.asarray(values, dtype=np.float32))
    per_replica = strategy.run(lambda: tf.identity(local))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def sum_over_workers(strategy, values, world: int) -> np.ndarray:
    """Sums a float vector that each of `world` workers gives; all workers get the total. (Each
    of a worker's replicas adds it to all_reduce_sum's total: counted once per worker here.)"""
    return all_reduce_sum(strategy, values) / (strategy.num_replicas_in_sync // world)


class BeforeEvaluation(keras.callbacks.Callback):
    """Calls `prepare()` once an epoch, when the epoch's model is final and before anything
    reads it: before validation, or at the epoch's end when there is none (on_test_begin never
    comes). Callbacks listed before others in fit() prepare first."""

    def on_epoch_begin(self, epoch, logs=None):
        self.prepared = False

    def on_test_begin(self, logs=None):
        self._prepare_once()

    def on_epoch_end(self, epoch, logs=None):
        self._prepare_once()

    def _prepare_once(self):
        if not self.prepared:
            self.prepare()
            self.prepared = True

    def prepare(self):
        raise NotImplementedError


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

    def __init__(
        self,
        config: TrainConfig,
        state: TrainingState,
        target_stop: SynchronizedTargetStop,
        images_per_epoch: int,
        timeline: dict,
    ):
        super().__init__()
        self.config, self.state, self.target_stop = config, state, target_stop
        self.images_per_epoch, self.timeline = images_per_epoch, timeline
        self.started = time.perf_counter() - sum(e["epoch_s"] for e in state.history)

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
        self.state.history.append(
            {
                "epoch": epoch + 1,
                **{k: float(v) for k, v in (logs or {}).items()},
                "images_per_s": self.images_per_epoch / train_s,
                "learning_rate": float(keras.backend.get_value(self.model.optimizer.learning_rate)),
                "epoch_s": now - self.epoch_started,
                "elapsed_s": now - self.started,
                "ended_unix": time.time(),
            }
        )
        self.state.epochs_done = epoch + 1
        if self.target_stop.reached_at_epoch is not None:
            self.state.stop_reason = (
                f"target reached at epoch {epoch + 1} ({self.config.target_metric} >= {self.config.target})"
            )
        elif epoch + 1 >= self.config.epochs:
            self.state.stop_reason = "epochs exhausted"


class Checkpointing(keras.callbacks.Callback):
    """Per epoch: model, optimizer state and the run's state into a checkpoint, reported to
    Ray Train with the epoch's metrics; and, asked by PreemptionNotice, one in the middle of an
    epoch. Every worker saves (the strategy expects all to take part); only rank 0's is kept.
    `epoch_layout` is a context in which the model's weights are as an epoch's end leaves
    them (WeightAverage's average swapped in), so a mid-epoch checkpoint resumes like any."""

    def __init__(self, rank: int, state: TrainingState, before_report=None, epoch_layout=nullcontext):
        super().__init__()
        self.rank, self.state, self.before_report = rank, state, before_report
        self.epoch_layout = epoch_layout

    def on_epoch_end(self, epoch, logs=None):
        metrics = self.state.history[-1]
        self._save(
            {**metrics, "stop_reason": self.state.stop_reason, MODEL_SCORE: metrics.get("val_accuracy", UNVALIDATED)},
            before_report=self.before_report,
        )

    def save_mid_epoch(self, epoch: int, images_done: int) -> None:
        in_epoch = {"epoch": epoch + 1, "images_done": images_done}
        with self.epoch_layout():
            self._save(
                {"epoch": self.state.epochs_done, "in_epoch": in_epoch, MODEL_SCORE: UNVALIDATED}, in_epoch=in_epoch
            )

    def _save(self, metrics: dict, before_report=None, in_epoch: dict | None = None) -> None:
        with tempfile.TemporaryDirectory(prefix="digits-ckpt-") as directory:
            write_checkpoint(directory, self.model, self.state, in_epoch)
            if before_report:
                before_report()
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)


# Steps between two questions to Ray Train whether a node of the run is being preempted: each
# is a barrier of all workers through a Ray actor (BENCHMARKS.md has its cost against a step's).
PREEMPTION_CHECK_STEPS = 32


class PreemptionNotice(keras.callbacks.Callback):
    """Ray Train's advance notice that a node of the run is being preempted (a spot reclaim,
    `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`), asked every PREEMPTION_CHECK_STEPS
    steps by every worker alike (the question is a barrier). On a notice: a checkpoint at once,
    in the middle of the epoch. Then, right after it and at every later check, all workers
    decide together whether the deadline could come before the next check's checkpoint is
    saved; once it could, the checkpoint just taken (or one taken now) is the last, and the
    workers wait for Ray Train to restart the run without the node, which resumes at that
    checkpoint's image. So the steps lost are none, and the time lost is the wait. A
    checkpoint falling on an epoch's last step is the epoch's own, which comes right after."""

    steps_done = 0

    def __init__(self, strategy, checkpointing: Checkpointing, global_batch: int, rank: int, run_location: str):
        super().__init__()
        self.strategy, self.checkpointing, self.rank = strategy, checkpointing, rank
        self.global_batch, self.run_location = global_batch, run_location
        self.epoch_start = 0  # the image of its epoch that fit()'s first epoch starts at
        self.notice = None
        self.saved_s = 0.0
        # How far the next check can be: the longest time between two checks (the first
        # round, which holds tf.function's tracing, counts only until another is measured), and
        # past an epoch's end, the longest time from its last step to the end of its validation
        # and checkpoint.
        self.first_round_s = self.longest_round_s = self.epoch_end_s = 0.0
        self.steps_before_epoch = self.checked_at = 0
        self.round_started = self.last_step_ended = time.monotonic()
        self.at_epoch_end = None  # (why, last): a checkpoint left to the epoch's own
        # What the questions cost, for run.json: their number and seconds, and the steps between.
        self.cost = {"every_steps": PREEMPTION_CHECK_STEPS, "checks": 0, "check_s": 0.0}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        # Checkpointing, earlier in fit()'s callbacks, has saved the epoch by now.
        self.epoch_end_s = max(self.epoch_end_s, time.monotonic() - self.last_step_ended)
        self.epoch_start = 0
        self.steps_before_epoch = self.steps_done
        if self.at_epoch_end:
            (why, last), self.at_epoch_end = self.at_epoch_end, None
            self._recorded(why, epoch + 2, 0, last)
            if last:
                self._wait_then_ask_again()

    def on_train_batch_end(self, batch, logs=None):
        # Counted across epochs (an epoch can be shorter than the cadence); fit() calls this
        # after each execution of several steps, at the same steps on every worker.
        self.last_step_ended = time.monotonic()
        self.steps_done = self.steps_before_epoch + batch + 1
        if self.steps_done - self.checked_at < PREEMPTION_CHECK_STEPS:
            return
        self.checked_at = self.steps_done
        self._round_ended()
        if self.notice is None:
            started = time.monotonic()
            self.notice = ray.train.get_preemption_info()
            asked = time.monotonic() - started
            self.cost["checks"] += 1
            self.cost["check_s"] += asked
            self.round_started += asked
            if self.notice is not None:
                self._checkpoint(batch, "notice")
        elif self._deadline_near(batch):
            self._checkpoint(batch, "deadline")

    def _round_ended(self) -> None:
        now = time.monotonic()
        if self.first_round_s:
            self.longest_round_s = max(self.longest_round_s, now - self.round_started)
        else:
            self.first_round_s = now - self.round_started
        self.round_started = now

    def _checkpoint(self, batch: int, why: str) -> None:
        """A checkpoint at this step, the last if the deadline is near; after it, on a
        notice, training goes on; after the last, the workers wait."""
        if batch + 1 >= self.params["steps"]:  # the epoch's last step: its own checkpoint is next
            self.at_epoch_end = (why, why == "deadline" or self._deadline_near(batch))
            return
        started = time.monotonic()
        images_done = self.epoch_start + (batch + 1) * self.global_batch
        self.checkpointing.save_mid_epoch(self.epoch, images_done)
        self.saved_s = time.monotonic() - started
        last = why == "deadline" or self._deadline_near(batch)
        self._recorded(why, self.epoch + 1, images_done, last)
        if last:
            self._wait_then_ask_again()

    def _deadline_near(self, batch: int) -> bool:
        """Whether, on any worker's reckoning, the deadline could come before the next check
        and its checkpoint are done, with a margin of twice that time and 2 s (all workers
        take part)."""
        next_check_s = self.longest_round_s or self.first_round_s
        if self.params["steps"] - (batch + 1) < PREEMPTION_CHECK_STEPS:  # the epoch ends first
            next_check_s += self.epoch_end_s
        near = self._left_s() < 2 * (self.saved_s + next_check_s) + 2
        return bool(all_reduce_sum(self.strategy, [float(near)])[0])

    def _recorded(self, why: str, epoch: int, images_done: int, last: bool) -> None:
        """The checkpoint on record (epoch, 1-based, and image within it that a restart resumes
        at), and a notice on the console."""
        if self.rank != 0:
            return
        attempts.record(
            self.run_location,
            "preemption",
            {
                "why": why,
                "epoch": epoch,
                "images_done": images_done,
                "last": last,
                "deadline_ms": self.notice.deadline_ms,
                "checkpoint_s": round(self.saved_s, 2),
                "nodes": self.notice.preempted_node_ids,
                "ranks": self.notice.preempted_ranks,
            },
        )
        if why == "notice":
            where = f"image {images_done:,} of epoch {epoch}" if images_done else f"the end of epoch {epoch - 1}"
            then = "waiting for the node to go" if last else "training on"
            say(
                f"preemption notice for worker(s) {', '.join(map(str, self.notice.preempted_ranks))}: "
                f"checkpoint at {where}, {then}"
            )

    def _left_s(self) -> float:
        return self.notice.deadline_ms / 1000 - time.time() if self.notice.deadline_ms else math.inf

    def _wait_then_ask_again(self) -> None:
        """Ray Train ends this worker group at the deadline; a node that outlives it (a drain
        that was not carried out) lets training go on a while later, asking again."""
        time.sleep(max(0.0, self._left_s()) + WAIT_PAST_DEADLINE_S)
        self.notice = None


# How long workers that checkpointed for a preemption wait past its deadline for Ray Train to
# end them before they train on.
WAIT_PAST_DEADLINE_S = 120.0


class InjectedFault(keras.callbacks.Callback):
    """For fault tests (DIGITS_FAULT=MOMENT:EPOCH:RANK[,...], parsed by the driver into
    (moment, epoch, rank) triples, train.injected_faults): the worker of that rank kills
    itself with SIGKILL at that moment of that epoch, once per run, and says so in attempts/
    first. Moments: mid_epoch (half the epoch's steps done), validation (as it begins),
    checkpoint (saved locally, not yet reported: before the upload), after_epoch (reported,
    line printed: every worker waits there for the others first, so that rank 0 has printed
    the line before the victim dies). And two that kill nothing, both at the after_epoch
    moment: hold, where every worker of the group waits for ever, so that a test interrupts a
    run that is still going however fast the machine trains, not one that may have ended; and
    stall, where the worker's whole process is frozen (SIGSTOP) for STALL_S seconds, as a
    loaded machine or a paused VM freezes it, and a helper process thaws it."""

    def __init__(self, faults: list, rank: int, steps: int, run_location: str, strategy):
        super().__init__()
        done = {(entry["moment"], entry["epoch"], entry["rank"]) for entry in attempts.recorded(run_location, "fault")}
        left = [(moment, epoch, victim) for moment, epoch, victim in faults if (moment, epoch, victim) not in done]
        self.armed = {(moment, epoch) for moment, epoch, victim in left if victim == rank}
        self.wait_at = {epoch for moment, epoch, _ in left if moment in ("after_epoch", "hold", "stall")}  # every rank
        self.hold_at = {epoch for moment, epoch, _ in left if moment == "hold"}
        self.rank, self.steps, self.run_location, self.strategy = rank, steps, run_location, strategy

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 >= self.steps // 2:
            self._at("mid_epoch")

    def on_test_begin(self, logs=None):
        self._at("validation")

    def checkpoint_written(self) -> None:
        self._at("checkpoint")

    def on_epoch_end(self, epoch, logs=None):
        if self.epoch in self.wait_at:
            all_reduce_sum(self.strategy, [1.0])
        self._at("after_epoch")
        self._at("stall")
        if self.epoch in self.hold_at:
            self._at("hold")
            while True:
                time.sleep(1)

    def _at(self, moment: str) -> None:
        if (moment, self.epoch) in self.armed:
            attempts.record(self.run_location, "fault", {"moment": moment, "epoch": self.epoch, "rank": self.rank})
            if moment == "stall":
                subprocess.Popen(["sh", "-c", f"sleep {STALL_S}; kill -CONT {os.getpid()}"], start_new_session=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            elif moment != "hold":
                os.kill(os.getpid(), signal.SIGKILL)


# Longer than the 10 s TensorFlow allows a silent peer by default (training/worker.py).
STALL_S = 15


class ProgressLine(keras.callbacks.Callback):
    """Rank 0's line per epoch on the console; within epochs longer than `longer_than_s`, how
    far it is every `every_s` seconds (the driver's live line). Epochs count up to the time
    budget's plan once there is one."""

    def __init__(
        self, epochs: int, steps: int, state: TrainingState, every_s: float = 2.0, longer_than_s: float = 30.0
    ):
        super().__init__()
        self.epochs, self.steps, self.state = epochs, steps, state
        self.every_s, self.longer_than_s = every_s, longer_than_s
        self._supports_tf_logs = True  # seams.SUPPORTS_TF_LOGS: the batch hook reads no logs

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.started = epoch, time.monotonic()
        self.reported = self.started

    def on_train_batch_end(self, batch, logs=None):
        now, done = time.monotonic(), batch + 1
        elapsed = now - self.started
        if now - self.reported < self.every_s or elapsed / done * self.steps < self.longer_than_s:
            return
        self.reported = now
        left = elapsed / done * (self.steps - done)
        report_progress(
            text=f"epoch {self.epoch + 1}/{self.planned}: {done / self.steps:.0%} "
            f"({done:,}/{self.steps:,} steps), {left:.0f}s left in the epoch",
            left_s=round(left, 1),
        )

    def on_epoch_end(self, epoch, logs=None):
        say(progress_line(self.state.history[-1], self.planned))

    @property
    def planned(self) -> int:
        return self.state.epochs_planned(self.epochs)


def progress_line(entry: dict, epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4f}")
    parts.append(f"{entry['images_per_s']:,.0f} img/s")
    parts.append(f"epoch {entry['epoch_s']:.1f}s")
    parts.append(f"elapsed {entry['elapsed_s']:.1f}s")
    return "  ".join(parts)

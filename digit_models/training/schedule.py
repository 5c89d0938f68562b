"""How long a run trains and at what rate: the learning-rate schedule, and `--time-budget`,
which sizes the run's epochs (and stretches the schedule to end with them) from how long the
first epochs took, so that one command fits its budget on a slow machine and a fast one."""

from __future__ import annotations

import math
import time

import numpy as np

from digit_models.runtime.tf_setup import keras, tf
from digit_models.config import TrainConfig
from digit_models.training.callbacks import sum_over_workers
from digit_models.training.handoff import TrainingState


@keras.saving.register_keras_serializable(package="digits")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up from a tenth of `rate` over `warmup_steps`, or over a tenth of the run if
    that is shorter, then cosine decay to zero at `total_steps`. The length is a variable, so
    that a time budget can set it once the first epochs are timed without tracing the training
    step again (and the warm-up follows it: a plan of one epoch still decays to zero); it is
    saved with the model."""

    def __init__(self, rate: float, warmup_steps: int, total_steps: float):
        self.rate, self.warmup_steps = float(rate), int(warmup_steps)
        self.total_steps = tf.Variable(float(total_steps), trainable=False, name="total_steps")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(float(self.warmup_steps), tf.floor(self.total_steps / 10))
        warming = self.rate * (0.1 + 0.9 * step / tf.maximum(warmup, 1.0))
        decayed = tf.clip_by_value((step - warmup) / tf.maximum(self.total_steps - warmup, 1.0), 0.0, 1.0)
        cosine = 0.5 * self.rate * (1.0 + tf.cos(math.pi * decayed))
        return tf.where(step < warmup, warming, cosine)

    def get_config(self) -> dict:
        return {"rate": self.rate, "warmup_steps": self.warmup_steps, "total_steps": float(self.total_steps.numpy())}


def learning_rate(config: TrainConfig, steps_per_epoch: int, workers: int, epochs: int):
    """The constant rate for a group of `workers`, or a warm-up (one epoch, or a tenth of the
    run if shorter: a 2-epoch run cannot spend half its steps warming up) and cosine decay to
    zero at the last of `epochs` planned epochs' steps (the optimizer's step count survives
    restarts, rescaled when the group's size changes: worker.restore)."""
    rate = config.step_learning_rate(workers)
    if config.lr_schedule == "constant":
        return rate
    return WarmupCosine(rate, warmup_steps=steps_per_epoch, total_steps=epochs * steps_per_epoch)


# The plan is made after the first epoch and remade after each epoch up to the middle of the
# planned ones, the first three at least: the first epoch's time includes tracing the step,
# and the next few run slower than later ones, so the plan settles on more epochs' times, while
# the learning rate is still high, where stretching the schedule changes little.
SIZING_EPOCHS = 3
# Kept in hand at the end of a budget: what follows training (the final checkpoint, the
# model file and run.json, and Ray Train's poll of the workers), and a margin for epochs that
# run slower than the ones the plan was made from (a shared machine's speed drifts).
AFTER_TRAINING_S = 15.0
DRIFT_MARGIN = 0.05
# --scoring-reserve: scoring an image is a forward pass in large batches, where training one is
# a forward and a backward pass and an update in small ones (and an epoch's time includes
# validation and the checkpoint): an epoch's images cost four to five times as long per image
# as scoring them, on slow machines and fast ones alike (docs/accuracy.md, "Within a time budget").
# Planning with the low end keeps a margin.
SCORING_SPEEDUP = 4.0


def epochs_that_fit(minutes: float, elapsed_s: float, epoch_s: float, done: int, reserved_s: float) -> int:
    """The most epochs (counting the `done` ones) whose remaining ones, each `epoch_s` long
    plus the drift margin, end by the budget with AFTER_TRAINING_S and `reserved_s` to spare;
    at least `done`."""
    left = minutes * 60 - elapsed_s - AFTER_TRAINING_S - reserved_s
    return done + max(0, int(left // (epoch_s * (1 + DRIFT_MARGIN))))


class TimeBudget(keras.callbacks.Callback):
    """--time-budget: after each epoch of the first half of the plan (and the first
    SIZING_EPOCHS), the epochs that fit in what is left of the budget (counted from the
    command's start, less the time --scoring-reserve's images will take to score), at most
    --epochs; the schedule is stretched or shrunk to end with them.
    Every worker plans from the slowest worker's times, so all plan the same epochs and stop
    together. A resumed run (`digits train --resume`, a later command) keeps its plan: the
    budget was the first command's."""

    def __init__(
        self,
        strategy,
        config: TrainConfig,
        state: TrainingState,
        steps: int,
        images_per_epoch: int,
        rank: int,
        world: int,
        command_started: float,
        resumed: bool,
        clock=time.time,
    ):
        super().__init__()
        self.strategy, self.config, self.state, self.steps = strategy, config, state, steps
        self.images_per_epoch = images_per_epoch
        self.rank, self.world, self.command_started = rank, world, command_started
        self.resumed, self.clock = resumed, clock

    def on_epoch_end(self, epoch, logs=None):
        if self.state.time_budget is None:
            self.state.time_budget = {"minutes": self.config.time_budget, "epoch_ends_s": [], "plans": []}
        sizing = self.state.time_budget
        if "epochs_planned" not in sizing or (
            not self.resumed and epoch < max(SIZING_EPOCHS, sizing["epochs_planned"] // 2)
        ):
            self._plan(sizing, done=epoch + 1)
        planned = sizing["epochs_planned"]
        if epoch + 1 >= planned and self.state.stop_reason is None:
            self.state.stop_reason = f"time budget: {planned} epochs fit in {self.config.time_budget:g} min"
            self.model.stop_training = True

    def _plan(self, sizing: dict, done: int) -> None:
        mine = np.zeros(2 * self.world)
        mine[self.rank] = self.state.history[-1]["epoch_s"]
        mine[self.world + self.rank] = self.clock() - self.command_started
        totals = sum_over_workers(self.strategy, mine, self.world)
        ends = sizing["epoch_ends_s"]
        ends.append(round(float(totals[self.world :].max()), 2))
        if len(ends) == 1:  # the first epoch's time includes tracing the step: an upper bound
            epoch_s = sizing["first_epoch_s"] = round(float(totals[: self.world].max()), 2)
        else:  # from one epoch's end to the next: validation and checkpoint included
            epoch_s = (ends[-1] - ends[0]) / (len(ends) - 1)
        scoring_s = self.config.scoring_reserve * epoch_s / (self.images_per_epoch * SCORING_SPEEDUP)
        planned = max(
            1,
            min(
                self.config.epochs,
                epochs_that_fit(self.config.time_budget, ends[-1], epoch_s, done, reserved_s=scoring_s),
            ),
        )
        sizing["plans"].append(planned)
        sizing.update(
            planned_from_epoch_s=round(epoch_s, 2),
            epochs_planned=planned,
            **({"scoring_reserve_s": round(scoring_s, 1)} if self.config.scoring_reserve else {}),
        )
        schedule = getattr(self.model.optimizer, "_learning_rate", None)  # seams.LEARNING_RATE
        if isinstance(schedule, WarmupCosine):
            schedule.total_steps.assign(float(planned * self.steps))

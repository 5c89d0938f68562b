"""The search's early stopping: Ray Tune's ASHA (asynchronous successive halving), by epoch."""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

# A trial's first rung is after its first epoch, and at each rung (epochs 1, 2, 4, ...) the
# trials below the median of those that reached it before them stop.
GRACE_EPOCHS = 1
REDUCTION_FACTOR = 2


class EpochHalving(AsyncHyperBandScheduler):
    """ASHA on val_accuracy after each epoch (the reports' `epoch`, which a trial continued by a
    resumed search carries on from its checkpoint, where Tune's count of reports would start
    again), except at a trial's last epoch: the trial ends then by itself, writing its model
    and run.json, which stopping it would cut off (ASHA stops a trial at a rung that falls on
    its last epoch like at any other). Its result still counts at that rung for the others."""

    def __init__(self, epochs: int, default_epochs: int):
        super().__init__(
            time_attr="epoch",
            max_t=epochs,
            grace_period=GRACE_EPOCHS,
            reduction_factor=REDUCTION_FACTOR,
            stop_last_trials=False,
        )
        self.default_epochs = default_epochs  # a trial's epochs unless its sample has its own

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get("epoch", 0) >= trial.config.get("epochs", self.default_epochs):
            return TrialScheduler.CONTINUE
        return decision

"""The search's early stopping: Ray Tune's ASHA (asynchronous successive halving), by epoch."""

from __future__ import annotations

from ray import tune
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
    its last epoch like at any other). Its result still counts at that rung for the others.

    Ray Tune saves no scheduler with a search's state, so a resumed search would judge its
    trials against empty rungs and let every one go on. The results seen are kept in
    `results` instead, which `SchedulerRecord` saves with the search's state, and each trial
    Tune adds back on a resume has its results put in the rungs again."""

    def __init__(self, epochs: int, default_epochs: int):
        super().__init__(
            time_attr="epoch",
            max_t=epochs,
            grace_period=GRACE_EPOCHS,
            reduction_factor=REDUCTION_FACTOR,
            stop_last_trials=False,
        )
        self.default_epochs = default_epochs  # a trial's epochs unless its sample has its own
        self.results: dict[str, list[dict]] = {}  # each trial's epoch and val_accuracy reports

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        for result in self.results.get(trial.trial_id, ()):  # the decisions taken before stand
            super().on_trial_result(tune_controller, trial, result)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if "epoch" in result and "val_accuracy" in result:
            reported = {"epoch": result["epoch"], "val_accuracy": result["val_accuracy"]}
            self.results.setdefault(trial.trial_id, []).append(reported)
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get("epoch", 0) >= trial.config.get("epochs", self.default_epochs):
            return TrialScheduler.CONTINUE
        return decision


class SchedulerRecord(tune.Callback):
    """Saves the scheduler's results with the search's state each time Ray Tune saves it, and
    gives them back on a resume before Tune adds the trials back (Tune restores its callbacks'
    states first). The scheduler is the Tuner's own: both are kept in one pickle of the
    Tuner, so a restored Tuner's record and scheduler are the same pair again."""

    def __init__(self, scheduler: EpochHalving):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"results": self.scheduler.results}

    def set_state(self, state: dict) -> None:
        self.scheduler.results = state["results"]

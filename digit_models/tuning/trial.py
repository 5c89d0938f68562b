"""One trial of a search, as Ray Tune runs it in a trial actor: a `digits train` run of its own,
in TUNE_DIR/trials/<name>, started through the training driver (Ray Train V2's way under Tune:
the trial function starts the Train run, and a Train callback hands each report to Tune)."""

from __future__ import annotations

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from digit_models.config import SearchConfig, TrainConfig
from digit_models.storage.files import Folder
from digit_models.storage.run_dir import RunDir
from digit_models.training.driver import resume, train
from digit_models.tuning.space import trial_settings

TRIALS = "trials"  # TUNE_DIR's folder of the trials' run directories


def trial_name(trial_id: str) -> str:
    """A trial's name, and its run directory's: the counter Ray Tune ends its trial ids with
    (`7f3a2_00003` -> `003`), which is the trial's place in the search and the same after a
    resume."""
    return f"{int(trial_id.rsplit('_', 1)[-1]):03d}"


def trial_run_dir(tune_dir: str, name: str) -> RunDir:
    return RunDir(Folder(tune_dir).child(f"{TRIALS}/{name}"))


def run_trial(sampled: dict, search: SearchConfig, cpus_per_worker: int) -> None:
    """Trains the trial's sample of the space (`sampled`: TrainConfig fields). A trial that the
    search's resume starts again continues its run from its newest checkpoint, and one that
    had finished reports its epochs again without training."""
    run_dir = trial_run_dir(search.out, trial_name(tune.get_context().get_trial_id()))
    if run_dir.is_finished:  # finished after Tune last saved the search's state
        for entry in run_dir.read_run()["history"]:
            tune.report(entry)
        return
    if run_dir.is_file(RunDir.STARTED):
        resume(run_dir.location, callbacks=(EpochsToTune(),))
        return
    settings = {
        **search.fixed,
        **trial_settings(sampled, search.base().model),
        "data": search.data,
        "workers": search.workers_per_trial,
        "out": run_dir.location,
        "cpus_per_worker": search.fixed.get("cpus_per_worker", cpus_per_worker),
    }
    train(TrainConfig.from_preset(search.preset, **settings), callbacks=(EpochsToTune(),))


class EpochsToTune(TuneReportCallback):
    """Ray's Train-to-Tune callback, for the epochs' reports only: a checkpoint taken in the
    middle of an epoch (on a preemption notice) is reported to Ray Train too, without the
    epoch's metrics, and would reach the scheduler as a result without val_accuracy."""

    def after_report(self, run_context, metrics, checkpoint):
        if "in_epoch" not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)

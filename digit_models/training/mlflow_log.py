"""MLflow tracking for `digits train --mlflow URI`: one MLflow run per training run, with the
configuration as params, the per-epoch metrics, and run.json and model.keras as artifacts.

The driver creates the MLflow run before training, so its id is known to started.json (a resumed
run logs into the same MLflow run) and to rank 0, the only worker that logs: metrics after each
epoch's checkpoint, step = epoch. The driver adds the artifacts and ends the run once run.json
is written. Kept free of TensorFlow: the driver imports it.

MLflow keeps every value logged, and a worker group restarted from an earlier checkpoint runs
some epochs again; rank 0 therefore logs only the epochs after the last step MLflow has, so no
step appears twice (a re-run epoch keeps the values its first attempt logged).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from digit_models.errors import DigitsError
from digit_models.storage.files import shown_name, without_credentials
from digit_models.storage.run_dir import EPOCH_METRICS, RunDir

EXPERIMENT = "digits"


def client(tracking_uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise DigitsError("--mlflow: the mlflow package is not installed; pip install 'digit-models[mlflow]'") from None
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        # MLflow 3 refuses its file store unless told that it is wanted; a user who names a
        # file:// store has said so.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=tracking_uri)


def start_run(tracking_uri: str, config: dict, run_location: str, run_id: str | None = None) -> str:
    """A new MLflow run named after the run directory, with the configuration as params, or
    `run_id` (a resumed run) again."""
    tracking = client(tracking_uri)
    from mlflow.entities import Param

    if run_id:
        tracking.update_run(run_id, status="RUNNING")
        return run_id
    experiment = tracking.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else tracking.create_experiment(EXPERIMENT)
    name = shown_name(run_location)
    run_id = tracking.create_run(experiment_id, run_name=name).info.run_id
    tracking.log_batch(run_id, params=[Param(key, without_credentials(str(value))) for key, value in config.items()])
    return run_id


class EpochMetrics:
    """Rank 0's metric logger: every epoch of the history that MLflow does not have yet."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking, self.run_id = client(tracking_uri), run_id
        self.logged = max((metric.step for metric in self.tracking.get_metric_history(run_id, "loss")), default=0)

    def log(self, history: list[dict]) -> None:
        from mlflow.entities import Metric

        new = [entry for entry in history if entry["epoch"] > self.logged]
        metrics = [
            Metric(key, float(entry[key]), int(entry.get("ended_unix", 0) * 1000), entry["epoch"])
            for entry in new
            for key in EPOCH_METRICS
            if key in entry
        ]
        if metrics:
            self.tracking.log_batch(self.run_id, metrics=metrics)
            self.logged = new[-1]["epoch"]


def finish_run(tracking_uri: str, run_id: str, run_dir: RunDir) -> None:
    """run.json and model.keras as the run's artifacts, and the run marked finished."""
    tracking = client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="digits-mlflow-") as local:
        for name in (RunDir.RUN, RunDir.MODEL):
            Path(local, name).write_bytes(run_dir.read_bytes(name))  # run_dir may be a URI
        tracking.log_artifacts(run_id, local)
    tracking.set_terminated(run_id)

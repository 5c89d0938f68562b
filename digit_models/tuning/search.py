"""`digits tune`: the search's driver. A Ray Tune Tuner whose trials each start a Ray Train run
(tuning/trial.py), ranked by val_accuracy after every epoch by an asynchronous successive
halving scheduler (ASHA, tuning/scheduler.py), which stops the weak ones early; trials sampled by Tune's random
searcher, seeded; as many trials at once as the cluster's CPUs hold at --workers-per-trial.

TUNE_DIR holds:

    search.json   written first: the settings, the checked space, the CPUs of each trial's
                  workers (what --resume reads); rewritten with `finished_at` at the end
    trials/<n>/   each trial's run directory, as `digits train` writes it
    ray_tune/     Ray Tune's own saved state of the search (what Tuner.restore reads)
    results.csv, results.json, best.json   tuning/results.py

The space, the options and train.csv are checked before Ray starts; nothing is written before.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from digit_models.config import SearchConfig, TrainConfig
from digit_models.errors import DigitsError
from digit_models.runtime.console import live, quiet_actors
from digit_models.runtime.ray_runtime import cpus_per_process, ray_session
from digit_models.storage.files import Folder, is_uri, require_output_folder
from digit_models.storage.kaggle_csv import read_csv_chunks, resolve_train_csv
from digit_models.training.driver import utc
from digit_models.tuning.results import BEST, RESULTS_JSON
from digit_models.tuning.space import checked_space, default_space, read_space

SEARCH = "search.json"
TUNE_STATE = "ray_tune"

# What a trial's own process (Ray Tune's trial actor, which runs the training driver: it reads
# train.csv and waits for its Ray Train run) asks Ray for. Tune needs each trial to ask for
# something; a share of a CPU would leave the trials' workers, which ask for whole CPUs, one
# short on every node.
TRIAL_DRIVER_MEMORY = 256 << 20


def tune(config: SearchConfig, address: str | None = None) -> dict:
    """Runs the search; returns its summary (the trials' states, best.json). Everything the
    user gave is checked before Ray starts or anything is written."""
    config.validate()
    base = config.base()
    space = (
        checked_space(read_space(config.space_file), base, config.fixed, config.space_file)
        if config.space_file
        else default_space(config.preset, base, config.fixed)
    )
    tune_dir = _tune_dir(config.out)
    if tune_dir.exists(SEARCH):
        raise DigitsError(
            f"{config.out}: holds a search already; continue it with "
            f"`digits tune --resume {config.out}` or choose another --out"
        )
    require_output_folder(tune_dir, "choose another --out")
    train_csv = resolve_train_csv(config.data)
    for _ in read_csv_chunks(train_csv, labelled=True, limit=base.limit):
        pass  # every row checked, a chunk at a time: a bad row is one line now, not a failed trial per row
    config = dataclasses.replace(config, out=tune_dir.location, data=_absolute(config.data))
    with _trial_lines_off(), ray_session(address, dashboard=True):
        from ray import tune as ray_tune
        from ray.tune.search import BasicVariantGenerator

        from digit_models.tuning.scheduler import EpochHalving, SchedulerRecord
        from digit_models.tuning.space import to_tune

        cpus_per_worker, at_once = _trial_resources(config, base)
        tune_dir.create()
        tune_dir.write_json(
            SEARCH,
            {
                "config": dataclasses.asdict(config),
                "space": space,
                "cpus_per_worker": cpus_per_worker,
                "trials_at_once": at_once,
                "started_at": utc(time.time()),
            },
        )
        epochs = max(_ends(space["epochs"])) if "epochs" in space else base.epochs
        events = _events(config, epochs, base.model)
        scheduler = EpochHalving(epochs, base.epochs)
        tuner = ray_tune.Tuner(
            _trainable(config, cpus_per_worker),
            param_space=to_tune(space),
            tune_config=ray_tune.TuneConfig(
                metric="val_accuracy",
                mode="max",
                num_samples=config.trials,
                # The searcher limits the trials at once itself (Tune ignores max_concurrent_trials
                # beside a searcher of this kind).
                search_alg=BasicVariantGenerator(random_state=config.search_seed, max_concurrent=at_once),
                scheduler=scheduler,
                time_budget_s=config.time_budget * 60 if config.time_budget else None,
            ),
            run_config=ray_tune.RunConfig(
                name=TUNE_STATE,
                storage_path=tune_dir.location,
                verbose=0,
                callbacks=[events, SchedulerRecord(scheduler)],
                # A failed trial is recorded and the search goes on; its Ray Train run has
                # already spent its own restarts (--max-failures).
                failure_config=ray_tune.FailureConfig(max_failures=0),
            ),
        )
        return _fit(tuner, tune_dir, config.trials)


def resume(location: str, address: str | None = None) -> dict:
    """Continues an interrupted search with its own settings: finished and stopped trials stay
    as they are, trials that were running continue their runs from their newest checkpoints,
    and the rest start."""
    tune_dir = _tune_dir(location)
    if not tune_dir.is_file(SEARCH):
        raise DigitsError(f"{location}: no {SEARCH}, so not a search `digits tune` started")
    record = tune_dir.read_json(SEARCH)
    if record.get("finished_at"):
        raise DigitsError(f"{location}: the search finished at {record['finished_at']}; nothing to resume")
    if not tune_dir.exists(TUNE_STATE):
        raise DigitsError(f"{location}: stopped before Ray Tune saved the search; start it again with another --out")
    try:
        config = SearchConfig(**record["config"])
        cpus_per_worker = int(record["cpus_per_worker"])
    except (TypeError, KeyError, ValueError) as exc:
        raise DigitsError(f"{tune_dir.child(SEARCH)}: unreadable ({exc})") from None
    with _trial_lines_off(), ray_session(address, dashboard=True):
        from ray import tune as ray_tune

        # Tune's saved state is pickled: it is read only from a TUNE_DIR this command wrote.
        tuner = ray_tune.Tuner.restore(
            tune_dir.child(TUNE_STATE),
            trainable=_trainable(config, cpus_per_worker),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
        return _fit(tuner, tune_dir, config.trials)


def _fit(tuner, tune_dir: Folder, trials: int) -> dict:
    """Runs the search to its end, or until Ctrl-C (then KeyboardInterrupt, once Ray Tune has
    saved the search's state and the tables are written); returns the summary: the trials
    asked for, those that ran (fewer when the time budget ran out), their states, best.json."""
    from digit_models.tuning import events
    from digit_models.tuning.trial import run_trial

    # Ray Tune's per-trial logs (CSV, JSON, TensorBoard) would repeat what every trial's run
    # directory holds; its tables (its newer output engine prints some even when told to be
    # silent) and messages (a failed trial's traceback) stay off the console, which has a line
    # per trial event instead (tuning/events.py).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger = logging.getLogger("ray.tune")
    saved = tune_logger.level, signal.getsignal(signal.SIGINT)
    tune_logger.setLevel(logging.CRITICAL)
    # The trial actors (their class is named after the trial function) and the queues that carry
    # each trial's reports from its Ray Train controller (Ray's _QueueActor) print Ray's
    # traceback of their own stop whenever a trial is stopped early or the search interrupted.
    quiet_actors(run_trial.__name__, "_QueueActor")
    try:
        tuner.fit()
    finally:
        tune_logger.setLevel(saved[0])
        signal.signal(signal.SIGINT, saved[1])  # Ray Tune leaves its handler in
        live.clear()
    if events.SEARCH_INTERRUPTED.is_set():
        raise KeyboardInterrupt
    record = tune_dir.read_json(SEARCH)
    tune_dir.write_json(SEARCH, {**record, "finished_at": utc(time.time())})
    rows = tune_dir.read_json(RESULTS_JSON)
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    return {
        "trials": trials,
        "ran": len(rows),
        "states": states,
        "best": tune_dir.read_json(BEST) if tune_dir.is_file(BEST) else None,
    }


@contextmanager
def _trial_lines_off():
    """The trials' epoch lines stay off the console (each trial's, unnamed, would interleave)
    until Ray is shut down: a stopped trial's last lines can reach this driver after the search
    has returned."""
    saved = live.from_workers
    live.from_workers = False
    try:
        yield
    finally:
        live.from_workers = saved


def _trainable(config: SearchConfig, cpus_per_worker: int):
    from ray import tune as ray_tune

    from digit_models.tuning.trial import run_trial

    return ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, search=config, cpus_per_worker=cpus_per_worker),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )


def _events(config: SearchConfig, epochs: int, model: str):
    from digit_models.tuning.events import TrialEvents

    return TrialEvents(
        config.out, config.trials, epochs, config.fixed, model, config.time_budget * 60 if config.time_budget else None
    )


def _trial_resources(config: SearchConfig, base: TrainConfig) -> tuple[int, int]:
    """(CPUs per worker, trials at once): as many trials as the cluster's CPUs (and GPUs) hold
    with --workers-per-trial workers of --cpus-per-worker CPUs each; without --cpus-per-worker,
    one CPU per worker at first, then the CPUs shared out between the trials at once."""
    import ray

    workers = config.workers_per_trial
    cpus = int(ray.cluster_resources().get("CPU", 1))
    at_once = max(1, min(config.trials, cpus // (workers * (base.cpus_per_worker or 1))))
    if base.gpus_per_worker:
        gpus = ray.cluster_resources().get("GPU", 0)
        at_once = max(1, min(at_once, int(gpus // (workers * base.gpus_per_worker))))
    return base.cpus_per_worker or cpus_per_process(workers * at_once), at_once


def _tune_dir(location: str) -> Folder:
    return Folder(_absolute(location))


def _absolute(location: str) -> str:
    """Trials run in Ray Tune's actors, whose working directory is not the command's."""
    return location if is_uri(location) else str(Path(location).resolve())


def _ends(entry: dict) -> list:
    return entry["values"] if "values" in entry else [entry["min"], entry["max"]]

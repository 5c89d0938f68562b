"""`digits train`: data-parallel training on Ray Train, the driver side (training/worker.py is what
each worker runs): read and check train.csv, split off the validation rows, hand both to Ray
Train (training/backend.py), and write the run directory.

The driver reads train.csv once, into a spool on its disk (storage/row_spool.py), and a task on
its node puts the training and validation rows into Ray's object store once; every worker
fetches all of them from there (so workers on other machines never read the driver's disk) and
trains each step on its own slice of them (training/worker.py). Neither the driver nor Ray
Train's controller imports TensorFlow (training/backend.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import digit_models
from digit_models.training import mlflow_log
from digit_models.config import TrainConfig
from digit_models.runtime.cpu_features import require_bfloat16_cpu
from digit_models.errors import DigitsError
from digit_models.storage.files import file_sha256
from digit_models.storage.kaggle_csv import image_chunks, resolve_train_csv
from digit_models.storage.row_spool import RowSpool, split_parts, spooled, validation_count
from digit_models.runtime.ray_runtime import cluster_address, cpus_per_process, on_this_node, ray_session
from digit_models.storage.run_dir import RunDir
from digit_models.training.handoff import MODEL_SCORE, UNVALIDATED, Shares, WorkerInputs, WorkerOutcome


def train(config: TrainConfig, address: str | None = None, callbacks: tuple = ()) -> dict:
    """Trains on Ray and writes RUN_DIR/model.keras and run.json; returns run.json's content.

    Input is read and validated before Ray starts or anything is written. Ray is the one
    already connected, else the cluster at `address`, else an embedded local one. While the
    run trains, RUN_DIR holds started.json (what `resume` needs) and Ray's checkpoints;
    model.keras and then run.json appear only at the end, each atomically, so a run dir
    without run.json is an unfinished run. `callbacks`: more Ray Train callbacks for the run
    (`digits tune` passes the one that hands each epoch's metrics to Ray Tune).
    """
    called = time.time()
    config.validate()
    run_dir = RunDir(config.out)
    run_dir.require_new()
    return _run(config, run_dir, address, started=None, called=called, callbacks=callbacks)


def resume(run_dir: str, address: str | None = None, callbacks: tuple = ()) -> dict:
    """Continues an unfinished run (driver stopped by Ctrl-C, SIGTERM or a lost machine) from
    its last checkpoint, with its original configuration and the same training data."""
    called = time.time()
    folder = RunDir(run_dir)
    started = folder.read_started()
    try:
        config = TrainConfig(**_precision_named(started["config"]))
    except (TypeError, KeyError) as exc:
        raise DigitsError(f"{folder.child(folder.STARTED)}: unreadable ({exc})") from None
    config.validate()
    return _run(config, folder, address, started=started, called=called, callbacks=callbacks)


def _precision_named(saved: dict) -> dict:
    """A run's saved settings with a run started before --precision replaced --mixed-precision
    given the precision it trained in (16-bit compute: float16 on GPUs, bfloat16 on CPUs)."""
    if "mixed_precision" not in saved:
        return saved
    sixteen_bits = "auto" if saved.get("gpus_per_worker") else "bfloat16"
    settings = {name: value for name, value in saved.items() if name != "mixed_precision"}
    return {**settings, "precision": sixteen_bits if saved["mixed_precision"] else "float32"}


def train_func(loop_config: dict) -> WorkerOutcome:
    """What every Ray Train worker runs (training/worker.py, imported there: TensorFlow is loaded
    by the workers, not by whoever unpickles this function)."""
    from digit_models.training.worker import run_worker

    return run_worker(loop_config["inputs"])


def _run(
    config: TrainConfig, run_dir: RunDir, address: str | None, started: dict | None, called: float, callbacks: tuple
) -> dict:
    train_csv = resolve_train_csv(config.data)
    with spooled(image_chunks(train_csv, labelled=True, limit=config.limit), train_csv) as spool:
        return _train(config, run_dir, address, started, called, callbacks, train_csv, spool)


def _train(
    config: TrainConfig,
    run_dir: RunDir,
    address: str | None,
    started: dict | None,
    called: float,
    callbacks: tuple,
    train_csv: str,
    spool: RowSpool,
) -> dict:
    rows_read = spool.rows
    data_sha256 = file_sha256(train_csv)
    if started and started["data"]["sha256"] != data_sha256:
        raise DigitsError(
            f"{train_csv}: changed since the run started (sha256 {data_sha256}, "
            f"was {started['data']['sha256']}); cannot resume on different data"
        )
    faults = injected_faults(config)
    if config.precision == "bfloat16" and not config.gpus_per_worker and not cluster_address(address):
        require_bfloat16_cpu()  # an embedded Ray's workers run on this CPU (each checks its own)
    val_rows = validation_count(rows_read, config.val_fraction)
    train_rows = rows_read - val_rows
    too_few_val = config.val_fraction > 0 and val_rows < config.workers
    if train_rows < config.global_batch(config.workers) or too_few_val:
        raise DigitsError(
            f"{train_csv}: {rows_read} rows are too few for {config.workers} "
            f"worker(s) with --batch-size {config.batch_size} and "
            f"--val-fraction {config.val_fraction}"
        )
    mlflow_run_id = (
        mlflow_log.start_run(
            config.mlflow, asdict(config), run_dir.location, run_id=(started or {}).get("mlflow_run_id")
        )
        if config.mlflow
        else None
    )
    clock = time.time()
    with ray_session(address):
        ray_started = time.time()
        import ray
        import ray.train

        from digit_models.training.attempts import FailureRecorder, WorkerGroupWatch, group_sizes, restarts
        from digit_models.training.backend import tensorflow_trainer

        now = utc(clock)
        if started:
            started["resumed_at"].append(now)
        else:
            started = {
                "config": asdict(config),
                "started_at": now,
                "resumed_at": [],
                "data": {
                    "train_csv": train_csv,
                    "sha256": data_sha256,
                    "rows_read": rows_read,
                    "train_rows": train_rows,
                    "validation_rows": val_rows,
                },
                "mlflow_run_id": mlflow_run_id,
            }
        run_dir.write_started(started)
        train, validation = put_rows(spool, config.val_fraction, config.seed)
        inputs = WorkerInputs(
            config=config,
            rows_total=rows_read,
            run_dir=run_dir.location,
            mlflow_run_id=mlflow_run_id,
            train=train,
            validation=validation,
            faults=faults,
            driver_session=len(started["resumed_at"]),
            command_started_unix=called,
        )
        # Ray Train gives a worker group's resources this long to be granted before it tries
        # again; the wait for workers (WorkerGroupWatch) is checked at each such end. An
        # elastic group tries again sooner: for a while after a node is lost, the count Ray
        # Train sizes it by (Ray Data's autoscaling coordinator, refreshed every 20 s) still
        # has the node, and a group sized for it waits out the whole timeout before a
        # smaller one is tried. Only the grant is timed (granted at once when the resources
        # are there), not the workers' start.
        os.environ[START_TIMEOUT_VARIABLE] = str(
            min(
                ELASTIC_START_TIMEOUT_S if config.fewest_workers < config.workers else DEFAULT_START_TIMEOUT_S,
                config.wait_for_workers,
            )
        )
        trainer = tensorflow_trainer(
            train_func,
            controller_callbacks=[
                WorkerGroupWatch(run_dir.location, config.fewest_workers, config.workers, config.wait_for_workers)
            ],
            train_loop_config={"inputs": inputs},
            scaling_config=scaling_config(config),
            # The same name and storage path on resume: Ray Train then restores its
            # checkpoint bookkeeping and hands the workers the latest checkpoint.
            run_config=ray.train.RunConfig(
                name=RunDir.CHECKPOINTS,
                storage_path=run_dir.location,
                failure_config=ray.train.FailureConfig(
                    max_failures=config.max_failures, max_preemption_failures=config.max_preemptions
                ),
                checkpoint_config=checkpoint_config(config),
                callbacks=[FailureRecorder(run_dir.location), *callbacks],
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        fit_called = time.time()
        result = trainer.fit()
        fit_returned = time.time()
    outcome: WorkerOutcome = result.return_value
    state = outcome.state
    kept, kept_metrics = kept_checkpoint(result, config)
    with tempfile.TemporaryDirectory(prefix="digits-model-") as staging:
        kept.to_directory(staging)
        run_dir.write_bytes(RunDir.MODEL, Path(staging, RunDir.MODEL).read_bytes())
    workers = outcome.workers  # the last worker group's
    summary = {
        "model": config.model,
        "workers": workers,
        "worker_groups": group_sizes(run_dir.location),  # every group's size, in order
        "batch_size_per_worker": config.batch_size,
        "accumulate": config.accumulate,
        "sync_every": config.sync_every,
        "global_batch_size": config.global_batch(workers),
        "collective": ("NCCL" if config.gpus_per_worker else "RING")
        if workers > 1
        else None,  # a group of one has none
        # --sync-every averages the weights, always in float32
        "all_reduce_dtype": (config.gradient_dtype if config.sync_every == 1 else "float32") if workers > 1 else None,
        "learning_rate_per_update": config.step_learning_rate(workers),
        "epochs_planned": state.epochs_planned(config.epochs),
        "epochs_run": state.epochs_done,
        **({"time_budget": state.time_budget} if state.time_budget is not None else {}),
        "stop_reason": state.stop_reason,
        "history": state.history,
        "shards": outcome.shards,
        "worker_process": outcome.worker_process,  # rank 0's CPUs (threads), niceness, dtype policy
        "restarts": restarts(run_dir.location),
        # Rank 0's questions for a preemption notice in the last group: how many, their
        # seconds in all, and the steps between two (BENCHMARKS.md weighs them against a step).
        "preemption_checks": {**outcome.preemption_checks, "check_s": round(outcome.preemption_checks["check_s"], 3)},
        **(
            {"fault_injected": ",".join(f"{moment}:{epoch}:{rank}" for moment, epoch, rank in faults)} if faults else {}
        ),
        "data": started["data"],
        "config": asdict(config),
        "versions": library_versions(),
        "model_file": RunDir.MODEL,
        "model_epoch": kept_metrics["epoch"],  # the epoch model.keras is the end of (--keep)
        "tensorboard": RunDir.TENSORBOARD,
        "mlflow_run_id": mlflow_run_id,
        "started_at": started["started_at"],
        "resumed_at": started["resumed_at"],
        "wall_s": round(time.time() - called, 2),
        # Seconds since train() was called (at timeline_origin_unix), when each stage began
        # (worker stages: rank 0's, of the last attempt); the start-up is all before "first_step".
        "timeline_origin_unix": round(called, 3),
        "timeline": {
            name: round(at - called, 2)
            for name, at in {
                "data_read": clock,
                "ray_started": ray_started,
                "trainer_started": fit_called,
                **outcome.timeline,
                "trainer_returned": fit_returned,
                "finished": time.time(),
            }.items()
        },
    }
    run_dir.write_run(summary)
    if mlflow_run_id:
        mlflow_log.finish_run(config.mlflow, mlflow_run_id, run_dir)
    return summary


def checkpoint_config(config: TrainConfig):
    """Ray Train keeps the newest checkpoint (what a restart resumes from) and, with --keep
    best, the best by validation accuracy besides (what model.keras is taken from); with
    --keep last, the newest two."""
    import ray.train

    if config.keep == "best":
        return ray.train.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=MODEL_SCORE, checkpoint_score_order="max"
        )
    return ray.train.CheckpointConfig(num_to_keep=2)


def kept_checkpoint(result, config: TrainConfig):
    """The checkpoint model.keras comes from, and its metrics: the last epoch's, or with --keep
    best the epoch's of the best val_accuracy (the later epoch of equals; the last where
    nothing was validated). Checkpoints taken within an epoch are never chosen: the run goes on
    from them to the epoch's own."""
    epochs = [
        (checkpoint, metrics) for checkpoint, metrics in result.best_checkpoints or [] if "in_epoch" not in metrics
    ]
    if not epochs:
        return result.checkpoint, result.metrics
    if config.keep == "last":
        return max(epochs, key=lambda kept: kept[1]["epoch"])
    return max(epochs, key=lambda kept: (kept[1].get(MODEL_SCORE, UNVALIDATED), kept[1]["epoch"]))


# Moments of an epoch at which DIGITS_FAULT kills a worker, and "hold", at which the worker
# group stops where it is (callbacks.InjectedFault).
FAULT_MOMENTS = ("mid_epoch", "validation", "checkpoint", "after_epoch", "hold", "stall")


def injected_faults(config: TrainConfig) -> list[tuple[str, int, int]]:
    """DIGITS_FAULT=MOMENT:EPOCH:RANK[,...], for fault tests, as (moment, epoch, rank): that
    worker kills itself then, or with "hold" the whole group waits after that epoch until the
    command is interrupted, once (callbacks.InjectedFault); run.json and attempts/ record it."""
    specs = os.environ.get("DIGITS_FAULT")
    faults = []
    for spec in specs.split(",") if specs else []:
        moment, _, rest = spec.partition(":")
        epoch, _, rank = rest.partition(":")
        if (
            moment not in FAULT_MOMENTS
            or not (epoch.isdigit() and rank.isdigit())
            or not 1 <= int(epoch) <= config.epochs
            or int(rank) >= config.workers
        ):
            raise DigitsError(
                f"DIGITS_FAULT={specs}: expected MOMENT:EPOCH:RANK[,...], MOMENT one "
                f"of {', '.join(FAULT_MOMENTS)}, an epoch of the run and a worker's rank"
            )
        faults.append((moment, int(epoch), int(rank)))
    return faults


def put_rows(spool: RowSpool, val_fraction: float, seed: int) -> tuple[Shares, Shares]:
    """The training and the validation rows (validation_split's) into Ray's object store, a
    part of the file (RowSpool.parts) at a time, by a task on this node that reads them from
    the spool: the driver neither holds the rows nor maps them from the store. The task's
    objects are the driver's (a task's returns belong to its caller), so they outlive the
    task; the ObjectRefs are here at once, and the workers wait for the rows while Ray Train
    starts them."""
    import ray

    into_store = ray.remote(num_cpus=0)(split_parts)  # from a module light to import
    returns = into_store.options(num_returns=1 + 4 * len(spool.parts()), **on_this_node()).remote(
        spool, val_fraction, seed
    )
    val_rows, parts = returns[0], returns[1:]
    return Shares(parts[0::4], parts[1::4]), Shares(parts[2::4], parts[3::4], val_rows)


def scaling_config(config: TrainConfig):
    """A fixed-size group, or with --min-workers an elastic one: Ray Train starts it with as
    many workers as the cluster has room for (at least the minimum) and, while it runs, looks
    every ELASTIC_RESIZE_CHECK_S for room for more and restarts it bigger from the last
    checkpoint when there is."""
    import ray.train

    cpus = config.cpus_per_worker or cpus_per_process(config.workers)
    resources = {"CPU": cpus}
    if config.gpus_per_worker:
        resources["GPU"] = config.gpus_per_worker
    elastic = config.fewest_workers < config.workers
    return ray.train.ScalingConfig(
        num_workers=(config.fewest_workers, config.workers) if elastic else config.workers,
        use_gpu=config.gpus_per_worker > 0,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=ELASTIC_RESIZE_CHECK_S,
    )


# Ray Train's default: each look for room costs a restart from the last checkpoint when it finds
# some, so looking more often than about once a minute would cost more than it gains.
ELASTIC_RESIZE_CHECK_S = 60.0
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 60.0  # Ray Train 2.60's
ELASTIC_START_TIMEOUT_S = 10.0


def library_versions() -> dict:
    return {
        "digit_models": digit_models.__version__,
        "python": platform.python_version(),
        **{
            name: importlib.metadata.version(name)
            for name in ("tensorflow", "tf_keras", "ray", "numpy", "pandas", "pyarrow")
        },
    }


def utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))

"""Data-parallel training on a real local Ray with real TensorFlow, on real MNIST slices."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import ray.cloudpickle

from digit_models.storage.kaggle_csv import read_test_csv
from digit_models.errors import DigitsError
from digit_models.config import TrainConfig
from digit_models.training.driver import train
from tests.conftest import AUTO_PRECISION_HERE, SLICE_TEST_ROWS, run_digits

# The worker functions below live in this test module; ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_two_workers_train_on_disjoint_shards(dense_run, kaggle_dir):
    run = json.loads((dense_run / "run.json").read_text())
    assert run["workers"] == 2 and run["global_batch_size"] == 64
    assert run["shards"]["disjoint"] is True
    assert run["shards"]["train_rows_seen_by_two_workers"] == 0
    assert run["shards"]["train_rows"] == [896, 896]  # 1,800 training rows after the 10% split: 28 global batches of 64
    assert run["shards"]["validation_rows"] == [100, 100]
    assert run["data"]["rows_read"] == 2000 and run["data"]["validation_rows"] == 200
    manifest = json.loads((kaggle_dir / "manifest.json").read_text())
    assert run["data"]["sha256"] == manifest["files"]["train.csv"]


def test_run_json_records_the_run(dense_run):
    run = json.loads((dense_run / "run.json").read_text())
    assert run["stop_reason"] == "epochs exhausted" and run["epochs_run"] == 3
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3]
    for entry in run["history"]:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "images_per_s", "epoch_s", "elapsed_s"} <= set(entry)
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    assert {"tensorflow", "tf_keras", "ray", "numpy", "pandas", "pyarrow"} <= set(run["versions"])
    assert run["versions"]["tf_keras"].startswith("2.")
    assert run["config"]["model"] == "dense" and run["restarts"] == []
    assert run["worker_process"] == {
        "cpus": 1,
        "niceness": 0,  # not Ray's default 15
        "precision": AUTO_PRECISION_HERE,
    }


def test_the_saved_model_is_portable_keras_and_predicts_real_digits(dense_run, kaggle_dir):
    import tf_keras as keras

    model_file = dense_run / "model.keras"
    # The native .keras format is a zip; tf-keras can silently write HDF5 under that name.
    assert zipfile.is_zipfile(model_file)
    model = keras.models.load_model(model_file, safe_mode=True)
    test = read_test_csv(str(kaggle_dir / "test.csv"))
    predicted = model.predict(test.images, verbose=0).argmax(axis=1)
    labels = pd.read_csv(kaggle_dir / "test_labels.csv")["Label"].to_numpy()
    accuracy = float((predicted == labels).mean())
    assert accuracy > 0.80, accuracy  # the dense net after 3 epochs on 1,800 real digits


def test_model_keras_is_the_checkpoint_of_the_best_epoch(dense_run):
    """--keep best, the default: model.keras is, byte for byte, the checkpoint of the epoch with
    the best val_accuracy (the later of equals), and run.json says which epoch."""
    run = json.loads((dense_run / "run.json").read_text())
    assert run["model_epoch"] == max((entry["val_accuracy"], entry["epoch"]) for entry in run["history"])[1]
    states = {
        json.loads(state.read_text())["epochs_done"]: state.parent
        for state in (dense_run / "checkpoints").glob("*/state.json")
    }
    assert (states[run["model_epoch"]] / "model.keras").read_bytes() == (dense_run / "model.keras").read_bytes()


@pytest.mark.parametrize("keep, chosen", [("best", "epoch 2"), ("last", "epoch 4")])
def test_the_kept_checkpoint_is_the_best_validated_epoch_or_the_last(keep, chosen):
    """Among what Ray Train kept: a checkpoint taken within an epoch (on a preemption notice)
    is never the model, whatever it scores; of equal scores the later epoch; --keep last, the
    last epoch."""
    from types import SimpleNamespace

    from digit_models.training.driver import kept_checkpoint
    from digit_models.training.handoff import MODEL_SCORE, UNVALIDATED

    kept = [
        ("epoch 1", {"epoch": 1, MODEL_SCORE: 0.97}),
        ("epoch 2", {"epoch": 2, MODEL_SCORE: 0.98}),
        ("epoch 3", {"epoch": 3, "in_epoch": {"images_done": 64}, MODEL_SCORE: 0.99}),
        ("epoch 4", {"epoch": 4, MODEL_SCORE: 0.96}),
        ("epoch 0", {"epoch": 0, MODEL_SCORE: 0.98}),
    ]
    result = SimpleNamespace(best_checkpoints=kept, checkpoint="epoch 4", metrics=kept[3][1])
    assert kept_checkpoint(result, TrainConfig(keep=keep))[0] == chosen
    unvalidated = SimpleNamespace(
        best_checkpoints=[(f"epoch {n}", {"epoch": n, MODEL_SCORE: UNVALIDATED}) for n in (2, 3, 1)],
        checkpoint="epoch 3",
        metrics={},
    )
    assert kept_checkpoint(unvalidated, TrainConfig(keep=keep))[0] == "epoch 3"


def test_a_resume_refuses_train_csv_changed_since_the_start_and_touches_nothing(tmp_path, dense_run, kaggle_dir):
    """An unfinished run whose train.csv has had one pixel changed since it started: --resume
    is one line naming the file, exit 2, before Ray starts, and the run folder is as it was."""
    import shutil

    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(dense_run, run)
    for finished in ("run.json", "model.keras"):
        (run / finished).unlink()
    data.mkdir()
    rows = (kaggle_dir / "train.csv").read_text().splitlines(keepends=True)
    label, first_pixel, rest = rows[1].split(",", 2)
    rows[1] = ",".join([label, str(255 - int(first_pixel)), rest])
    (data / "train.csv").write_text("".join(rows))
    started = json.loads((run / "started.json").read_text())
    started["config"]["data"] = str(data)
    (run / "started.json").write_text(json.dumps(started))
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}

    done = subprocess.run(
        [sys.executable, "-m", "digit_models.cli", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"digits: error: {data / 'train.csv'}: changed since the run started (sha256 ")
    assert line.endswith(f"was {started['data']['sha256']}); cannot resume on different data")
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_a_run_dir_is_never_reused(dense_run, kaggle_dir):
    from digit_models.errors import DigitsError

    with pytest.raises(DigitsError, match="already holds a finished run"):
        train(TrainConfig(data=str(kaggle_dir), out=str(dense_run), model="dense"))


# ---------------------------------------------------------------------------- synchronized stop


def _skewed_metric_train_func(config: dict) -> None:
    """Real MWMS training where each rank's local `accuracy` reaches the target at a different
    epoch (config["reached"][rank]); records the epoch each rank stopped at."""
    import tensorflow as tf
    import tf_keras as keras

    from digit_models.training.callbacks import SynchronizedTargetStop

    rank = ray.train.get_context().get_world_rank()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    features = np.random.default_rng(rank).normal(size=(64, 4)).astype(np.float32)
    data = strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensor_slices((features, features[:, :1])).batch(8).repeat()
    )
    reached = config["reached"][rank]

    class RankLocalAccuracy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["accuracy"] = 1.0 if epoch + 1 >= reached else 0.5

    stop = SynchronizedTargetStop(strategy, "accuracy", 0.999)
    history = model.fit(
        data, epochs=config["epochs"], steps_per_epoch=4, callbacks=[RankLocalAccuracy(), stop], verbose=0
    )
    Path(config["out"], f"rank{rank}.json").write_text(
        json.dumps({"epochs": len(history.epoch), "reached_at": stop.reached_at_epoch})
    )


@pytest.mark.timeout(300)  # a worker deciding alone would hang the other in an all-reduce
def test_workers_with_different_local_metrics_stop_at_the_same_epoch(tmp_path, ray_local):
    from digit_models.training.backend import tensorflow_trainer

    tensorflow_trainer(
        _skewed_metric_train_func,
        train_loop_config={"reached": [2, 4], "epochs": 8, "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="skew"),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # rank 0 alone would have stopped after epoch 2; the collective waits for rank 1 (epoch 4)
    assert ranks == [{"epochs": 4, "reached_at": 4}, {"epochs": 4, "reached_at": 4}]


def _report_once(config: dict) -> None:
    ray.train.report({"done": 1})


def test_a_run_given_no_datasets_starts_no_actor_to_hand_them_out(tmp_path, ray_local):
    """Ray Train starts a DatasetManager actor for every worker group, datasets or none: a Python
    process starting beside the workers' TensorFlow import. Ours are given none."""
    from ray.util.state import list_actors

    from digit_models.training.backend import tensorflow_trainer

    tensorflow_trainer(
        _report_once,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="no-datasets"),
    ).fit()
    job = ray.get_runtime_context().get_job_id()
    started = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("job_id", "=", job)],
        limit=10_000,
        raise_on_missing_output=False,
    )
    names = {actor.class_name for actor in started}
    assert "RayTrainWorker" in names and "DatasetManager" not in names


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "first_epoch_end_s,scoring,plans",
    [
        # 5 s to start, a first epoch of 10 s (tracing included), then 4 s each, in 60 s with 15 s
        # kept for the end: after epoch 1, 2 more epochs fit (30 s at 10.5 s each); after epoch 2,
        # 6 more at 4.2 s; the plan is remade after each epoch up to the middle of the plan (8 // 2).
        (15.0, 0, [3, 8, 8, 8]),
        # The same with a scoring reserve of 4 epochs' images: 4 x 1,000 images scored at 4x the
        # training speed take one epoch's time, recomputed from each plan's epoch time (and the
        # middle of a plan of 7 comes an epoch sooner).
        (15.0, 4_000, [2, 7, 7]),
        # Over budget at the first epoch's end: stop at once, after it.
        (50.0, 0, [1]),
    ],
)
def test_the_budget_plans_the_epochs_that_fit_from_the_epochs_timed_so_far(first_epoch_end_s, scoring, plans):
    """The planner alone, on an injected clock: real Keras callback and schedule, one replica."""
    from digit_models.training.handoff import TrainingState
    from digit_models.training.schedule import TimeBudget, WarmupCosine
    from digit_models.runtime.tf_setup import keras, tf

    steps = 10
    config = TrainConfig(
        data="train.csv",
        out="run",
        model="dense",
        epochs=1000,
        lr_schedule="cosine",
        time_budget=1.0,
        scoring_reserve=scoring,
    )
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(WarmupCosine(0.1, warmup_steps=steps, total_steps=steps)))
    state, now = TrainingState(), [0.0]
    budget = TimeBudget(
        tf.distribute.get_strategy(),
        config,
        state,
        steps,
        images_per_epoch=1_000,
        rank=0,
        world=1,
        command_started=0.0,
        resumed=False,
        clock=lambda: now[0],
    )
    budget.set_model(model)
    model.stop_training, epoch = False, 0
    while not model.stop_training:
        epoch_s = first_epoch_end_s - 5.0 if epoch == 0 else 4.0
        now[0] = first_epoch_end_s + 4.0 * epoch
        state.history.append({"epoch": epoch + 1, "epoch_s": epoch_s})
        budget.on_epoch_end(epoch)
        epoch += 1
    sizing = state.time_budget
    assert sizing["plans"] == plans and sizing["epochs_planned"] == plans[-1] == epoch
    assert state.stop_reason == f"time budget: {epoch} epochs fit in 1 min"
    assert float(model.optimizer._learning_rate.total_steps.numpy()) == epoch * steps


def test_a_time_budget_sizes_the_epochs_from_the_first_ones_and_the_schedule_ends_with_them(
    tmp_path, kaggle_dir, ray_local
):
    """Two workers on the real clock, a budget that fits some of the 1,000 allowed epochs after
    keeping time to score the test set with --tta 8 (nearly two epochs' time): the plan, made
    after each epoch of its first half, is the most epochs that fit by the recorded times, every
    planned epoch runs, and the cosine schedule saved with the model reaches zero at its last
    step. (How many epochs fit depends on the machine's speed; the planner's arithmetic is
    checked on an injected clock above.)"""
    from digit_models.config import TrainConfig
    from digit_models.training.schedule import (
        AFTER_TRAINING_S,
        DRIFT_MARGIN,
        SCORING_SPEEDUP,
        SIZING_EPOCHS,
        WarmupCosine,
    )
    from digit_models.runtime.tf_setup import keras
    from digit_models.training.driver import train

    run_dir, minutes, scoring = tmp_path / "run", 0.75, 9 * SLICE_TEST_ROWS
    run = train(
        TrainConfig(
            data=str(kaggle_dir),
            out=str(run_dir),
            model="dense",
            workers=2,
            epochs=1000,
            cpus_per_worker=1,
            lr_schedule="cosine",
            time_budget=minutes,
            scoring_reserve=scoring,
            # a dense net can fit this slice's training rows perfectly; the
            # held-out rows it cannot, so the target never ends the run first:
            target_metric="val_accuracy",
            target=1.0,
            keep="last",  # model.keras of the last epoch, whose schedule is the last plan's
        )
    )
    sizing = run["time_budget"]
    planned, ends, plans = sizing["epochs_planned"], sizing["epoch_ends_s"], sizing["plans"]
    assert len(ends) == len(plans) and plans[-1] == planned == run["epochs_planned"]
    # Planned again after each epoch while in the first half of the plan made before it:
    assert all(done < max(SIZING_EPOCHS, previous // 2) for done, previous in enumerate(plans[:-1], 1))
    assert len(plans) == planned or len(plans) >= max(SIZING_EPOCHS, planned // 2)  # then no more
    epoch_s = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else sizing["first_epoch_s"]
    steps = min(run["shards"]["train_rows"]) // run["batch_size_per_worker"]
    # Scoring is estimated from the training speed of the epochs the last plan was made from:
    scoring_s = scoring * epoch_s / (steps * run["global_batch_size"] * SCORING_SPEEDUP)
    assert sizing["scoring_reserve_s"] == pytest.approx(scoring_s, abs=0.1) and scoring_s > epoch_s

    def fits(epochs: int) -> bool:
        return (
            ends[-1] + (epochs - len(ends)) * epoch_s * (1 + DRIFT_MARGIN) + AFTER_TRAINING_S + scoring_s
            <= minutes * 60
        )

    assert fits(planned) or planned == len(ends)  # over budget already: stop at once
    assert not fits(planned + 1)
    assert run["epochs_run"] == planned
    assert run["stop_reason"] == f"time budget: {planned} epochs fit in {minutes:g} min"
    schedule = keras.models.load_model(run_dir / "model.keras").optimizer._learning_rate
    assert isinstance(schedule, WarmupCosine)
    assert float(schedule.total_steps.numpy()) == planned * steps
    assert float(schedule(planned * steps)) == pytest.approx(0, abs=1e-9)


# ---------------------------------------------------------------------------- the CLI


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, kaggle_dir):
    """In a real process (the whole corpus runs in-process in test_bad_input.py)."""
    run_dir = tmp_path / "run"
    done = run_digits("train", "--data", str(kaggle_dir / "test.csv"), "--out", str(run_dir), timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("digits: error:")]
    assert len(errors) == 1 and "no 'label' column" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workers", "0"], "--workers 0: must be at least 1"),
        (["--model", "resnet"], "--model resnet: choose one of cnn, deep_cnn, dense"),
        (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
        (["--weight-average", "1"], "--weight-average 1.0: must be in [0, 1)"),
        (["--dropout", "0.2"], "--dropout: model cnn has no dropout layers (these do: deep_cnn)"),
        (["--model", "deep_cnn", "--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
        (["--limit", "40", "--workers", "2"], "40 rows are too few"),
        (["--limit", "120", "--workers", "2", "--sync-every", "2"], "120 rows are too few"),  # 108 train < 2 x 2 x 32
        (["--sync-every", "0"], "--sync-every 0: must be at least 1"),
        (["--sync-every", "2", "--accumulate", "2"], "--accumulate 2 with --sync-every 2: choose one"),
        (["--sync-every", "2", "--weight-average", "0.99"], "--weight-average with --sync-every 2: each worker's"),
        (["--profile-steps", "5:2"], "--profile-steps 5:2: must be FIRST:LAST with 1 <= FIRST <= LAST"),
        (["--profile-steps", "0:3"], "--profile-steps 0:3: must be FIRST:LAST with 1 <= FIRST <= LAST"),
        (["--profile-steps", "5"], "argument --profile-steps: 5: expected FIRST:LAST, two step numbers"),
        (["--target", "1.5"], "--target 1.5: must be in (0, 1]"),
        (["--target-metric", "val_accuracy", "--val-fraction", "0"], "needs a validation split"),
        (["--scoring-reserve", "252000"], "--scoring-reserve keeps time free in a --time-budget: give one"),
        (["--scoring-reserve", "-1", "--time-budget", "15"], "--scoring-reserve -1: must be >= 0"),
    ],
)
def test_bad_training_options(tmp_path, kaggle_dir, capsys, args, message):
    from digit_models.cli import main

    assert main(["train", "--data", str(kaggle_dir), "--out", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_preset_fills_only_the_options_not_given():
    from digit_models.config import PRESETS, TrainConfig

    config = TrainConfig.from_preset("best", epochs=3, seed=7)
    assert (config.preset, config.epochs, config.seed) == ("best", 3, 7)
    assert config.model == PRESETS["best"]["model"] and config.augment and config.recompute_batchnorm
    assert TrainConfig.from_preset(None) == TrainConfig()
    other_model = TrainConfig.from_preset("best", model="cnn")  # best's dropout is deep_cnn's
    assert other_model.dropout is None
    other_model.validate()
    with pytest.raises(DigitsError, match="--preset quick: choose one of fast, best"):
        TrainConfig.from_preset("quick")


UNTUNED_INPUT_PROBE = """
import json
import numpy as np
from digit_models.runtime.tf_setup import configure_tensorflow
configure_tensorflow(1)
from digit_models.config import TrainConfig
from digit_models.training.worker import EpochOrder, multi_worker_strategy
images, labels = np.zeros((64, 28, 28), np.uint8), np.zeros(64, np.uint8)
strategy = multi_worker_strategy(TrainConfig())
ours = EpochOrder(64, 8, rank=0, world=1, seed=0).batches(images, labels, 0, 0, replicas=1, cpus=1)
batches = iter(strategy.distribute_datasets_from_function(lambda _: ours))
next(batches)
# The worker's input as the strategy iterates it: one tf.data pipeline per device, fed by ours.
device_pipelines = [device._dataset for device in batches._iterators[0]._iterator._device_iterators]
print(json.dumps([pipeline.options().autotune.enabled for pipeline in [ours, *device_pipelines]]))
"""


def test_no_training_input_pipeline_autotunes():
    """Destroying an autotuned tf.data iterator waits out its tuning thread's sleep, which held
    fit() tens of seconds after its last epoch: neither our pipeline nor the strategy's per-device
    ones may autotune."""
    done = subprocess.run([sys.executable, "-c", UNTUNED_INPUT_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    autotune_enabled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(autotune_enabled) >= 2 and all(enabled is False for enabled in autotune_enabled)  # unset: on


SHARED_ROWS_PROBE = """
import json
import numpy as np
from digit_models.runtime.tf_setup import configure_tensorflow
configure_tensorflow(1)
from digit_models.config import TrainConfig
from digit_models.training.worker import EpochOrder, joined, multi_worker_strategy
import ray

def private_mb():
    [kb] = [line.split()[1] for line in open("/proc/self/status") if line.startswith("RssAnon:")]
    return int(kb) / 1024

ray.init(num_cpus=1, include_dashboard=False)
parts = [ray.put(np.full((n, 28, 28), 1, np.uint8)) for n in (120_000, 80_000)]
images, labels = joined(parts), np.zeros(200_000, np.uint8)
strategy = multi_worker_strategy(TrainConfig())
held = private_mb()
order = EpochOrder(len(images), 8, rank=0, world=1, seed=0)
batches = iter(strategy.distribute_datasets_from_function(lambda _: order.batches(images, labels, 0, 0, 1, 1)))
before = [int(strategy.experimental_local_results(next(batches)[0])[0].numpy().max()) for _ in range(3)]
images[...] = 2  # once the worker's pipelines and their iterators exist
after = [int(strategy.experimental_local_results(next(batches)[0])[0].numpy().max()) for _ in range(200)]
print(json.dumps({"rows": len(images), "before": before[0], "after": after[-1],
                  "grown_mb": private_mb() - held, "rows_mb": images.nbytes / 2**20}))
"""


def test_the_training_input_reads_the_rows_where_the_worker_holds_them():
    """A worker holds the training rows once: its pipeline, and the strategy's per-device ones
    behind it, read the array the worker joined from the object store's chunks, with no copy of
    their own: rows written after iteration began are the rows the batches come from (through
    tf.constant they were not), and the worker's private memory grows by far less than the rows
    as its pipelines start (tf.data's default graph rewrites kept a copy of every row)."""
    done = subprocess.run([sys.executable, "-c", SHARED_ROWS_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert (probe["rows"], probe["before"], probe["after"]) == (200_000, 1, 2)
    assert probe["grown_mb"] < 0.5 * probe["rows_mb"], probe

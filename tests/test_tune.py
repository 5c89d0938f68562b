"""`digits tune`: real Ray Tune over real `digits train` runs on the MNIST slice. One search,
interrupted with Ctrl-C and resumed, carries the checks of a whole search (the scheduler's early
stops, the run directories, the tables and best.json against the runs' own records, the best
trial scoring); the space's checks run without Ray."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from ray import cloudpickle
from ray.tune.experiment import Trial

from digit_models.cli import _train_config, build_parser
from digit_models.config import SearchConfig, TrainConfig
from digit_models.errors import DigitsError
from digit_models.tuning.results import train_command
from digit_models.tuning.scheduler import EpochHalving, SchedulerRecord
from digit_models.tuning.space import DEFAULT_SPACES, checked_space, default_space, option, trial_settings
from tests.conftest import REPO, run_digits

# Seeded (--search-seed 0), this space's 4 trials are two good learning rates first and two
# hopeless ones after (1e-5 reaches about 20% in an epoch): each hopeless trial reaches its
# first rung after a good one has, so the scheduler stops it there, whatever the timing.
SPACE = "learning-rate: [0.00001, 0.003]\nbatch-size: [32, 64]\n"
OUR_LINE = re.compile(
    r"^(trial \d{3} (started: |finished: |stopped early after epoch |failed: )"
    r"|trial \d{3}: epoch \d+, val_accuracy \d\.\d{4}$|\d+ trials: |train it again: digits train "
    r"|trials \d+/4 done, \d+ running)"
)  # the live line, in a log every 30 s


def _search(tmp_path: Path, kaggle_dir: Path, space: str, trials: int, epochs: int) -> tuple[list[str], Path, Path]:
    """`digits tune`'s arguments for a search of the slice over `space` (written to
    tmp_path/space.yaml) into tmp_path/search; and those two paths."""
    space_file, tune_dir = tmp_path / "space.yaml", tmp_path / "search"
    space_file.write_text(space)
    arguments = ["tune", "--data", str(kaggle_dir), "--out", str(tune_dir), "--trials", str(trials)]
    return [*arguments, "--epochs", str(epochs), "--space", str(space_file)], space_file, tune_dir


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "space, message",
    [
        (
            "lerning-rate: [0.001]\n",
            "lerning-rate: not a `digits train` option that can vary; did you mean learning-rate?",
        ),
        ("val-fraction: [0.1, 0.2]\n", "val-fraction: cannot vary between trials"),
        ("batch-size: {min: 0, max: 64}\n", "batch-size: --batch-size 0: must be at least 1"),
        ("learning-rate: {min: 0.01, max: 0.001}\n", "learning-rate: min 0.01 is not below max 0.001"),
        ("batch-size: [32, 6.5]\n", "batch-size: 6.5 is not an integer"),
        ("epochs: [2]\n", "epochs: given on the command line as well (--epochs)"),
        ("learning-rate: [0.001\n", "not YAML or JSON"),
    ],
)
def test_a_bad_space_is_refused_in_one_line_before_ray_starts(tmp_path, kaggle_dir, space, message):
    search, space_file, out = _search(tmp_path, kaggle_dir, space, trials=2, epochs=2)
    # A cluster address nothing answers at: a command that got as far as Ray would fail there.
    done = run_digits(*search, env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)
    line = _one_error_line(done)
    assert line.startswith(f"digits: error: {space_file}: ") and message in line, line
    assert not out.exists()


@pytest.mark.parametrize("preset", [None, "fast", "best"])
def test_every_preset_has_a_default_space_that_digits_train_accepts(preset):
    base = SearchConfig(data="data", out="t", trials=2, preset=preset).base()
    space = default_space(preset, base, {})
    assert {option(field) for field in space} == set(DEFAULT_SPACES[preset])


def test_the_default_space_leaves_out_what_the_command_line_fixes():
    search = SearchConfig(data="data", out="t", trials=2, preset="best", fixed={"learning_rate": 0.002, "model": "cnn"})
    space = default_space("best", search.base(), search.fixed)
    assert "learning_rate" not in space and "dropout" not in space  # fixed; cnn has no dropout
    assert space["batch_size"] == {"values": [32, 64, 128]}
    assert space["weight_average"] == {"values": [0.0, 0.99, 0.999]}
    with pytest.raises(DigitsError, match="space.yaml: dropout: no model of the search has dropout layers"):
        checked_space({"dropout": [0.2]}, search.base(), search.fixed, "space.yaml")
    mixed = checked_space(
        {"model": ["cnn", "deep_cnn"], "dropout": {"min": 0.1, "max": 0.3, "log": True}},
        TrainConfig(),
        {},
        "space.yaml",
    )
    assert mixed == {"model": {"values": ["cnn", "deep_cnn"]}, "dropout": {"min": 0.1, "max": 0.3, "log": True}}


def test_a_trial_of_a_model_without_dropout_layers_leaves_the_sampled_rate_out():
    assert trial_settings({"model": "cnn", "dropout": 0.2}, "deep_cnn") == {"model": "cnn"}
    assert trial_settings({"dropout": 0.2}, "deep_cnn") == {"dropout": 0.2}
    assert trial_settings({"dropout": 0.2, "batch_size": 64}, "cnn") == {"batch_size": 64}


def test_best_json_command_trains_the_trial_settings_again():
    """Every setting of the trial, without the preset: a switch the preset turns on and the
    trial turned off has no option of its own."""
    trial = TrainConfig.from_preset(
        "best", data="/data", out="/t/trials/003", workers=2, augment=False, learning_rate=0.00123, cpus_per_worker=1
    )
    command = shlex.split(train_command(asdict(trial), fixed={}))
    assert command[:2] == ["digits", "train"] and "--cpus-per-worker" not in command
    again = _train_config(build_parser().parse_args(command[1:]))
    assert {**asdict(again), "out": trial.out, "preset": "best", "cpus_per_worker": 1} == asdict(trial)


def _scheduler() -> EpochHalving:
    scheduler = EpochHalving(epochs=4, default_epochs=4)
    scheduler.set_search_properties("val_accuracy", "max")  # what the Tuner tells it
    return scheduler


def test_a_resumed_search_judges_its_trials_against_the_results_from_before_the_interrupt():
    """The scheduler and its record as Tuner.restore gets them back (one pickle, the record's
    state set before the trials are added again): a hopeless trial's first epoch is stopped
    against the good one's, which a fresh scheduler would let go on."""
    scheduler = _scheduler()
    record = SchedulerRecord(scheduler)
    pickled_at_start = cloudpickle.dumps((scheduler, record))  # as the Tuner's pickle holds them
    good, hopeless = (Trial("run_trial", config={}, trial_id=f"a1b2_0000{n}", stub=True) for n in range(2))
    scheduler.on_trial_add(None, good)
    for epoch, accuracy in [(1, 0.91), (2, 0.95)]:
        assert scheduler.on_trial_result(None, good, {"epoch": epoch, "val_accuracy": accuracy}) == "CONTINUE"
    saved = cloudpickle.dumps(record.get_state())  # Ray Tune's save of its callbacks' states

    restored_scheduler, restored_record = cloudpickle.loads(pickled_at_start)
    restored_record.set_state(cloudpickle.loads(saved))
    for trial in (good, hopeless):
        restored_scheduler.on_trial_add(None, trial)
    assert restored_scheduler.on_trial_result(None, hopeless, {"epoch": 1, "val_accuracy": 0.2}) == "STOP"
    assert restored_scheduler.on_trial_result(None, good, {"epoch": 3, "val_accuracy": 0.96}) == "CONTINUE"
    fresh = _scheduler()
    fresh.on_trial_add(None, hopeless)
    assert fresh.on_trial_result(None, hopeless, {"epoch": 1, "val_accuracy": 0.2}) == "CONTINUE"


def _digits_process(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "digit_models.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_placement_group_left_by_a_killed_actor_is_removed_at_the_end_of_the_command(ray_local, another_ray):
    """What an interrupted search can leave behind (the group of a trial's Ray Train run, its
    controller killed): the command's end removes it, and leaves a detached group alone; with
    another Ray running on this machine, which Ray's State API client, unguided, gives up on."""
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

    from digit_models.runtime.ray_runtime import remove_own_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def place(self) -> str:
            group = placement_group([{"CPU": 1}])
            ray.get(group.ready())
            return group.id.hex()

    controller = Controller.remote()
    left = ray.get(controller.place.remote())
    ray.kill(controller)
    detached = placement_group([{"CPU": 0.01}], lifetime="detached")
    try:
        ray.get(detached.ready())
        time.sleep(1)  # the creator's death reaches the GCS, which keeps the group while the job lives
        assert placement_group_table()[left]["state"] == "CREATED"
        remove_own_placement_groups()
        deadline = time.time() + 10
        while placement_group_table()[left]["state"] != "REMOVED" and time.time() < deadline:
            time.sleep(0.2)
        assert placement_group_table()[left]["state"] == "REMOVED"
        assert placement_group_table()[detached.id.hex()]["state"] == "CREATED"
    finally:  # the later tests need the session Ray's CPUs whatever happened here
        for group in (left, detached.id.hex()):
            if placement_group_table()[group]["state"] != "REMOVED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))


def _no_placement_group_is_left() -> None:
    """The session Ray holds no placement group once a search has ended (one left behind would
    hold CPUs that every later command waits for)."""
    from ray.util import placement_group_table

    deadline = time.time() + 30
    while time.time() < deadline:
        held = {key: group["bundles"] for key, group in placement_group_table().items() if group["state"] != "REMOVED"}
        if not held:
            return
        time.sleep(0.5)
    raise AssertionError(f"placement groups left: {held}")


def test_an_interrupted_search_resumes_finishes_and_its_best_trial_scores(tmp_path, kaggle_dir, shared_ray_env):
    arguments, _, tune_dir = _search(tmp_path, kaggle_dir, SPACE, trials=4, epochs=3)
    search = _digits_process(*arguments, env={**os.environ, **shared_ray_env})
    seen, ended, later = [], False, None
    deadline = time.time() + 400
    # Ctrl-C once a trial has ended and a later one has trained an epoch: the resume then has
    # an early stop behind it, a trial to continue from its checkpoint and trials to start.
    for line in search.stdout:
        seen.append(line.rstrip("\n"))
        ended = ended or " finished: " in line or " stopped early " in line
        started = re.match(r"trial (\d{3}) started: ", line)
        later = later or (started.group(1) if ended and started else None)
        if (later and line.startswith(f"trial {later}: epoch ")) or time.time() > deadline:
            break
    search.send_signal(signal.SIGINT)
    rest, errors = search.communicate(timeout=180)
    assert search.returncode == 130, errors
    assert errors.strip().splitlines()[-1] == "digits: interrupted", errors
    first = json.loads((tune_dir / "search.json").read_text())
    assert "finished_at" not in first and (tune_dir / "results.json").is_file()
    before = {row["trial"]: row["state"] for row in json.loads((tune_dir / "results.json").read_text())}
    assert "unfinished" in before.values(), before  # the trials running at the Ctrl-C
    _no_placement_group_is_left()

    resumed = run_digits("tune", "--resume", str(tune_dir), env=shared_ray_env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    _no_placement_group_is_left()
    console = seen + rest.splitlines() + resumed.stdout.splitlines()
    assert all(OUR_LINE.match(line) for line in console), console  # no Ray Tune tables or chatter
    assert "Traceback" not in errors + resumed.stderr and "│" not in errors + resumed.stderr

    rows = json.loads((tune_dir / "results.json").read_text())
    assert sorted(row["trial"] for row in rows) == ["000", "001", "002", "003"]
    states = {row["trial"]: row["state"] for row in rows}
    assert set(states.values()) <= {"finished", "stopped early"} and "stopped early" in states.values(), states
    listed = {
        entry["run"]: entry for entry in json.loads(run_digits("runs", "--json", str(tune_dir / "trials")).stdout)
    }
    best_value = -1.0
    for row in rows:  # the table against each run directory's own records
        run_dir = tune_dir / row["run_dir"]
        expected = {"finished": "finished", "stopped early": "unfinished"}[row["state"]]
        assert listed[row["trial"]]["state"] == expected
        assert listed[row["trial"]]["best_val_accuracy"] == row["best_val_accuracy"]
        if row["state"] == "finished":
            run = json.loads((run_dir / "run.json").read_text())
            assert (run_dir / "model.keras").is_file()
            assert row["epochs"] == run["epochs_run"] == 3
            assert row["val_accuracy"] == run["history"][run["model_epoch"] - 1]["val_accuracy"]
            # A weak trial first at a rung has nothing to be compared with and goes on (ASHA),
            # so a finished trial may have either rate; the best is the higher rate's (below).
            assert run["config"]["learning_rate"] == row["learning-rate"] in (0.00001, 0.003)
            assert run["config"]["batch_size"] == row["batch-size"]
            best_value = max(best_value, row["val_accuracy"])
        else:
            assert not (run_dir / "run.json").exists() and (run_dir / "started.json").is_file()
            assert row["epochs"] < 3
    csv_rows = (tune_dir / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0].startswith("trial,state,")

    best = json.loads((tune_dir / "best.json").read_text())
    assert best["val_accuracy"] == best_value and states[best["trial"]] == "finished"
    best_run = json.loads((tune_dir / "trials" / best["trial"] / "run.json").read_text())
    assert best["config"] == best_run["config"]
    command = shlex.split(best["command"])
    assert command[command.index("--learning-rate") + 1] == "0.003"
    assert json.loads((tune_dir / "search.json").read_text())["finished_at"]

    scored = tmp_path / "scored"
    done = run_digits(
        "predict",
        "--run",
        str(tune_dir / "trials" / best["trial"]),
        "--input",
        str(kaggle_dir / "test.csv"),
        "--out",
        str(scored),
        env=shared_ray_env,
    )
    assert done.returncode == 0, done.stderr
    assert len((scored / "submission.csv").read_text().splitlines()) == 1 + 1_500
    again = run_digits("tune", "--resume", str(tune_dir), env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert _one_error_line(again).endswith("nothing to resume")


def test_a_failed_trial_is_recorded_and_the_search_goes_on_with_each_trial_an_mlflow_run(
    tmp_path, kaggle_dir, shared_ray_env, monkeypatch
):
    """A trial whose batch is larger than the slice's training rows fails in its own driver: its
    row says failed with our one-line error, the other trial finishes and is the best, and
    MLflow holds the finished trial's run under the trial's name."""
    search, _, tune_dir = _search(tmp_path, kaggle_dir, "batch-size: [16, 4096]\n", trials=2, epochs=1)
    store = str(tmp_path / "mlruns")
    # --search-seed 2 draws 4096, then 16.
    done = run_digits(*search, "--search-seed", "2", "--mlflow", store, env=shared_ray_env)
    assert done.returncode == 0, done.stderr
    rows = {row["batch-size"]: row for row in json.loads((tune_dir / "results.json").read_text())}
    failed, finished = rows[4096], rows[16]
    assert failed["state"] == "failed" and finished["state"] == "finished"
    assert "rows are too few for 1 worker(s) with --batch-size 4096" in failed["error"]
    assert f"trial {failed['trial']} failed: " in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert "1 failed, 1 finished" in done.stdout
    assert json.loads((tune_dir / "best.json").read_text())["trial"] == finished["trial"]

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store, as the trials' runs had
    tracking = MlflowClient(store)
    logged = tracking.search_runs([tracking.get_experiment_by_name("digits").experiment_id])
    run = json.loads((tune_dir / finished["run_dir"] / "run.json").read_text())
    assert [(entry.info.run_name, entry.info.run_id, entry.info.status) for entry in logged] == [
        (finished["trial"], run["mlflow_run_id"], "FINISHED")
    ]
    assert logged[0].data.params["batch_size"] == "16"

"""Faults with real processes: a killed Ray Train worker, an interrupted and resumed run, a
terminated scoring run. No Ray process may outlive the command that started it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digit_models.training import attempts
from tests.conftest import REPO, ray_processes, run_digits


def _start_digits(*args: str, ray_tmpdir: str, env: dict | None = None) -> subprocess.Popen:
    # SIGINT handled as in a terminal even when the tests themselves run in the background,
    # where a shell starts them with SIGINT ignored, and a child would inherit that.
    return subprocess.Popen(
        [sys.executable, "-m", "digit_models.cli", *args],
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": ray_tmpdir, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _checkpointed_epoch(run_dir: Path) -> int:
    """The last epoch whose checkpoint Ray Train has registered; 0 before the first. (A
    checkpoint folder alone may still be mid-report, and a restart before registration
    rightly starts from scratch.)"""
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
        return max((result["metrics"]["epoch"] for result in results), default=0)
    except (OSError, ValueError, KeyError):  # not there yet, or caught mid-write
        return 0


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        for pid in children.get(pending.pop(), []):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found.append((pid, command))
            pending.append(pid)
    return found


def _train_workers(driver: int) -> list[int]:
    return [pid for pid, command in _descendants(driver) if command.startswith("ray::RayTrainWorker")]


@pytest.mark.timeout(600)
def test_a_run_survives_a_killed_worker_and_a_stopped_driver_and_runs_each_epoch_once(
    tmp_path, kaggle_dir, ray_tmpdir, shared_ray_env
):
    """One run through both faults. A Ray Train worker killed mid-run: the group is replaced and
    resumes from the last checkpoint. Then Ctrl-C: the driver stops cleanly (status 130, no
    model or run.json, no Ray left), and `--resume` finishes the planned epochs."""
    run_dir = tmp_path / "run"
    # val_accuracy 1.0 on 200 held-out digits is out of reach: every planned epoch runs. The
    # group holds after epoch 3, so the run is still going when it is interrupted.
    child = _start_digits(
        "train",
        "--model",
        "cnn",
        "--data",
        str(kaggle_dir),
        "--workers",
        "2",
        "--epochs",
        "4",
        "--max-failures",
        "1",
        "--target-metric",
        "val_accuracy",
        "--target",
        "1.0",
        "--out",
        str(run_dir),
        ray_tmpdir=ray_tmpdir,
        env={"DIGITS_FAULT": "hold:3:0"},
    )
    _wait_for(lambda: _checkpointed_epoch(run_dir) >= 1 or child.poll() is not None, 300, "epoch 1's checkpoint")
    victims = _train_workers(child.pid)
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)  # one real worker process, mid-run
    # The new group's start is on record before it trains; a checkpoint registered after that is
    # its own. (The old group's last checkpoint can still register after the kill, so a new
    # checkpoint alone does not show that a new group started.)
    _wait_for(
        lambda: len(attempts.recorded(str(run_dir), "start")) >= 2 or child.poll() is not None,
        300,
        "the replaced worker group's start",
    )
    replaced_after = _checkpointed_epoch(run_dir)
    _wait_for(
        lambda: _checkpointed_epoch(run_dir) > replaced_after or child.poll() is not None,
        300,
        "a checkpoint from the replaced worker group",
    )
    _wait_for(lambda: attempts.recorded(str(run_dir), "fault") or child.poll() is not None, 300, "the hold")
    assert child.poll() is None, "the run ended before it could be interrupted"
    assert not set(_train_workers(child.pid)) & set(victims)  # a new group

    child.send_signal(signal.SIGINT)  # once: one Ctrl-C must be enough
    try:
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()  # still running only if the test has failed
    assert child.returncode == 130, stderr[-3000:]
    assert stderr.strip().endswith("digits: interrupted")
    assert not (run_dir / "run.json").exists() and not (run_dir / "model.keras").exists()
    assert not ray_processes(ray_tmpdir)

    refused = run_digits("train", "--model", "cnn", "--data", str(kaggle_dir), "--out", str(run_dir))
    assert refused.returncode == 2 and "holds an unfinished run; continue it with" in refused.stderr

    # On the session's Ray: the driver-lost test's resume is the one that starts and stops its own.
    resumed = run_digits("train", "--resume", str(run_dir), timeout=400, env=shared_ray_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["epochs_run"] == 4 and run["stop_reason"] == "epochs exhausted"
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3, 4]  # none twice
    # Two restores from a checkpoint: the replaced worker group, then the resumed run.
    [after_kill, after_resume] = [entry["resumed_after_epoch"] for entry in run["restarts"]]
    assert 1 <= after_kill < after_resume == 3
    assert len(run["resumed_at"]) == 1 and run["shards"]["disjoint"] is True

    again = run_digits("train", "--resume", str(run_dir))
    assert again.returncode == 2 and "already finished" in again.stderr


@pytest.mark.timeout(600)
def test_a_driver_lost_with_its_machine_leaves_a_run_that_resumes(tmp_path, kaggle_dir, ray_tmpdir):
    """The driver and its embedded Ray killed outright after epoch 1's checkpoint (SIGKILL to
    every process, as when the machine they run on is lost): no run.json, and `--resume`
    goes on from the last checkpoint and runs every epoch once."""
    run_dir = tmp_path / "run"
    child = _start_digits(
        "train",
        "--model",
        "dense",
        "--data",
        str(kaggle_dir),
        "--epochs",
        "3",
        "--target-metric",
        "val_accuracy",
        "--target",
        "1.0",
        "--out",
        str(run_dir),
        ray_tmpdir=ray_tmpdir,
        env={"DIGITS_FAULT": "hold:2:0"},  # still going when killed, however fast the machine
    )
    _wait_for(lambda: _checkpointed_epoch(run_dir) >= 1 or child.poll() is not None, 300, "epoch 1's checkpoint")
    assert child.poll() is None, "the run ended before it could be killed"
    # Rounds until none is left: a process SIGKILLed with a large address space still shows its
    # command line while the kernel tears it down, and the raylet may fork a worker meanwhile.
    deadline = time.monotonic() + 30
    while True:
        left = [child.pid, *(pid for pid, _ in _descendants(child.pid)), *ray_processes(ray_tmpdir)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if child.poll() is not None and not ray_processes(ray_tmpdir) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    child.communicate(timeout=60)
    checkpointed = _checkpointed_epoch(run_dir)
    assert not (run_dir / "run.json").exists() and not ray_processes(ray_tmpdir)

    resumed = run_digits("train", "--resume", str(run_dir), timeout=400, env={"RAY_TMPDIR": ray_tmpdir})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3]  # none twice
    [restart] = run["restarts"]
    assert restart["kind"] == "resume" and 1 <= checkpointed <= restart["resumed_after_epoch"] < 3
    assert f"resuming after epoch {restart['resumed_after_epoch']}" in resumed.stdout
    assert not ray_processes(ray_tmpdir)


@pytest.mark.timeout(600)
def test_restarts_spent_end_the_run_in_one_line_that_says_how_to_go_on(
    tmp_path, kaggle_dir, ray_tmpdir, shared_ray_env
):
    """A worker killed in epoch 2 of a run that allows no restart: exit 1, our one line last
    (after Ray's one line on the dead worker process), and the --resume it names finishes."""
    run_dir = tmp_path / "run"
    failed = run_digits(
        "train",
        "--model",
        "dense",
        "--data",
        str(kaggle_dir),
        "--epochs",
        "3",
        "--max-failures",
        "0",
        "--out",
        str(run_dir),
        timeout=400,
        env={"RAY_TMPDIR": ray_tmpdir, "DIGITS_FAULT": "mid_epoch:2:0"},
    )
    assert failed.returncode == 1, failed.stderr[-3000:]
    ours = [line for line in failed.stderr.splitlines() if line.startswith("digits:")]
    assert ours == failed.stderr.splitlines()[-1:], failed.stderr
    assert re.fullmatch(
        r"digits: error: the workers failed once more than --max-failures allows \(\w+: [^\n]+\); "
        rf"`digits train --resume {re.escape(str(run_dir))}` goes on from the last checkpoint",
        ours[0],
    ), ours
    assert not (run_dir / "run.json").exists() and not ray_processes(ray_tmpdir)

    resumed = run_digits("train", "--resume", str(run_dir), timeout=400, env=shared_ray_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3]
    assert run["restarts"][-1]["kind"] == "resume" and run["restarts"][-1]["resumed_after_epoch"] == 1


@pytest.mark.timeout(300)
def test_sigterm_during_training_stops_the_workers_and_exits_143(tmp_path, kaggle_dir, ray_tmpdir):
    """SIGTERM, as a scheduler sends it, while the driver waits on Ray Train: the run's workers
    are stopped, the status is 143 with one line, and the run stays resumable."""
    run_dir = tmp_path / "run"
    child = _start_digits(
        "train",
        "--model",
        "dense",
        "--data",
        str(kaggle_dir),
        "--workers",
        "2",
        "--epochs",
        "2",
        "--target-metric",
        "val_accuracy",
        "--target",
        "1.0",
        "--out",
        str(run_dir),
        ray_tmpdir=ray_tmpdir,
        env={"DIGITS_FAULT": "hold:1:0"},
    )
    _wait_for(lambda: _checkpointed_epoch(run_dir) >= 1 or child.poll() is not None, 300, "epoch 1's checkpoint")
    assert child.poll() is None, "the run ended before it could be terminated"
    workers = _train_workers(child.pid)
    child.send_signal(signal.SIGTERM)
    try:
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()  # still running only if the test has failed
    assert child.returncode == 143, stderr[-3000:]
    assert stderr.strip() == "digits: terminated"
    assert not (run_dir / "run.json").exists() and (run_dir / "started.json").exists()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert not ray_processes(ray_tmpdir)


@pytest.mark.timeout(300)
def test_sigterm_during_scoring_exits_143_and_writes_nothing(tmp_path, kaggle_dir, dense_run, ray_tmpdir):
    out = tmp_path / "scored"
    child = _start_digits(
        "predict",
        "--run",
        str(dense_run),
        "--input",
        str(kaggle_dir / "test.csv"),
        "--out",
        str(out),
        ray_tmpdir=ray_tmpdir,
    )
    _wait_for(lambda: list(tmp_path.glob(".scored.partial-*")) or child.poll() is not None, 120, "scoring to start")
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".scored.partial-*"))
    assert not ray_processes(ray_tmpdir)  # a re-run after a kill: tests/test_scoring.py


@pytest.mark.timeout(180)
def test_an_embedded_ray_never_joins_a_stale_default_cluster(ray_tmpdir):
    """`ray start --head` names its cluster in RAY_TMPDIR/ray/ray_current_cluster (/tmp/ray/ by
    default) and plain `ray.init()` joins whatever that names, even a cluster long gone. Ours
    must start its own. (In a folder of the test's own: the machine's file is left alone.)"""
    stale = "192.0.2.1:6380"  # TEST-NET: nothing answers there
    (Path(ray_tmpdir) / "ray").mkdir()
    (Path(ray_tmpdir) / "ray" / "ray_current_cluster").write_text(stale)
    joined = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ray\n"
            "from digit_models.runtime.ray_runtime import ray_session\n"
            "with ray_session():\n"
            "    print(ray.get_runtime_context().gcs_address)\n"
            "    print('started its own head:', ray._private.worker._global_node.head)",
        ],
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": ray_tmpdir},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert joined.returncode == 0, joined.stderr[-2000:]
    address, started = joined.stdout.strip().splitlines()
    assert address != stale and started == "started its own head: True"
    assert not ray_processes(ray_tmpdir)


# ---------------------------------------------------------------------------- issue: faults at any moment

# (moment, epoch, rank) of each kill, and the epoch the next worker group resumes after: the
# last whose checkpoint was whole in storage, however far Ray Train had got registering it.
KILLS = [("mid_epoch", 2, 1, 1), ("validation", 3, 1, 2), ("checkpoint", 4, 0, 3), ("after_epoch", 5, 1, 5)]
# And rank 0, which serves TensorFlow's coordination between the workers, frozen after epoch 4
# (by the group that goes on to epoch 5's line).
STALL = "stall:4:0"


@pytest.mark.timeout(600)
def test_a_worker_killed_at_any_moment_costs_at_most_the_epoch_in_progress(tmp_path, kaggle_dir, shared_ray_env):
    """One 2-worker run, killed four times: halfway through an epoch's steps, as validation
    begins, with rank 0's checkpoint saved but not yet uploaded, and right after an epoch's
    report and line (before Ray Train can have registered its checkpoint). Frozen once, too,
    for longer than TensorFlow's own heartbeat timeout: that costs no restart."""
    from digit_models.training.callbacks import STALL_S

    run_dir = tmp_path / "run"
    spec = ",".join([STALL] + [f"{moment}:{epoch}:{rank}" for moment, epoch, rank, _ in KILLS])
    # With a weight average, so that every restart resumes both it and the weights (swapped).
    done = run_digits(
        "train",
        "--model",
        "dense",
        "--data",
        str(kaggle_dir),
        "--workers",
        "2",
        "--epochs",
        "6",
        "--max-failures",
        "4",
        "--target-metric",
        "val_accuracy",
        "--target",
        "1.0",
        "--weight-average",
        "0.9",
        "--out",
        str(run_dir),
        env={**shared_ray_env, "DIGITS_FAULT": spec},
        timeout=550,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["fault_injected"] == spec
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3, 4, 5, 6]  # each once
    epoch_lines = [line.split() for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line[1] for line in epoch_lines] == [f"{epoch}/6" for epoch in range(1, 7)]
    elapsed = [float(line[line.index("elapsed") + 1].rstrip("s")) for line in epoch_lines]
    assert elapsed[4] - elapsed[3] >= STALL_S  # frozen in between
    assert [line for line in done.stdout.splitlines() if line.startswith("workers restarted")] == [
        f"workers restarted after a failure (restart {n} of this run), resuming after epoch {k[3]}"
        for n, k in enumerate(KILLS, 1)
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert [restart["resumed_after_epoch"] for restart in run["restarts"]] == [k[3] for k in KILLS]
    for (_, _, rank, _), restart in zip(KILLS, run["restarts"]):
        assert restart["why"].startswith(f"rank {rank}: WorkerHealthCheckFailedError"), restart  # it died
    assert (
        sorted(path.name.split("-", 1)[1] for path in (run_dir / "attempts").iterdir())
        == ["failure.json"] * 4 + ["fault.json"] * 5 + ["restart.json"] * 4 + ["start.json"] * 5
    )
    stalls = [json.loads(path.read_text()) for path in (run_dir / "attempts").glob("*-fault.json")]
    assert [(entry["epoch"], entry["rank"]) for entry in stalls if entry["moment"] == "stall"] == [(4, 0)]
    assert [restart["kind"] for restart in run["restarts"]] == ["failure"] * 4
    assert run["worker_groups"] == [2] * 5


def test_a_checkpoint_whose_upload_was_cut_short_is_passed_over(tmp_path):
    """The newest checkpoint's model file truncated, as a killed upload leaves it: a new worker
    group resumes from the one before."""
    from digit_models.training.checkpoints import newest_complete, write_checkpoint
    from digit_models.training.handoff import TrainingState
    from digit_models.runtime.tf_setup import keras

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
    for epoch in (1, 2):
        folder = tmp_path / "checkpoints" / f"checkpoint_{epoch}"
        folder.mkdir(parents=True)
        write_checkpoint(str(folder), model, TrainingState(epochs_done=epoch))
    assert newest_complete(str(tmp_path)).state.epochs_done == 2
    model_file = tmp_path / "checkpoints" / "checkpoint_2" / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    resumed = newest_complete(str(tmp_path))
    assert resumed.state == TrainingState(epochs_done=1) and resumed.in_epoch is None
    assert resumed.model_file == (tmp_path / "checkpoints" / "checkpoint_1" / "model.keras").read_bytes()
    (tmp_path / "checkpoints" / "checkpoint_1" / "state.json").unlink()
    assert newest_complete(str(tmp_path)) is None


@pytest.fixture
def mounted(tmp_path):
    """A fresh tmpfs mount with the given options (needs root, as in CI); unmounted after."""
    mounts = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True)


@pytest.mark.timeout(300)
def test_an_unwritable_or_full_output_is_one_line_and_leaves_nothing(
    tmp_path, mounted, kaggle_dir, dense_run, shared_ray_env
):
    read_only, full = mounted("ro", "size=1m,ro"), mounted("full", "size=48k")
    score = ("predict", "--run", str(dense_run), "--input", str(kaggle_dir / "test.csv"))
    for command in (
        ["train", "--data", str(kaggle_dir), "--out", str(read_only / "run")],
        [*score, "--out", str(read_only / "scored")],
    ):
        done = run_digits(*command, timeout=60)
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            f"digits: error: {command[-1]}: cannot write there: {read_only} is on a read-only file system"
        ]
    # Training whose temporary folder has no room for train.csv's parsed rows (storage/row_spool.py).
    done = run_digits("train", "--data", str(kaggle_dir), "--out", str(tmp_path / "run"), env={"TMPDIR": str(full)})
    assert done.returncode == 2
    assert re.fullmatch(
        f"digits: error: {full}/digits-rows-\\w+: cannot keep the rows read from {kaggle_dir / 'train.csv'} there "
        r"\(\[Errno 28\] No space left on device\); TMPDIR chooses another folder",
        done.stderr.rstrip("\n"),
    ), done.stderr
    assert list(full.iterdir()) == [] and not (tmp_path / "run").exists()
    # Scoring that runs out of room partway through writing its output.
    done = run_digits(*score, "--out", str(full / "scored"), env=shared_ray_env, timeout=200)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"digits: error: {full / 'scored'}: No space left on device (nothing of the output is kept)"
    ]
    assert list(full.iterdir()) == []


@pytest.mark.timeout(400)
def test_a_disk_that_fills_during_training_is_one_line_and_the_run_goes_on_once_there_is_room(
    mounted, kaggle_dir, shared_ray_env
):
    """The run's disk fills up a few checkpoints in: exit 1 with one line that names the run
    and says how to go on, no run.json or model; the disk given more room, `--resume` trains
    every epoch once."""
    disk = mounted("disk", "size=3m")  # the dense net's checkpoints fill it by epoch 3
    run_dir = disk / "run"
    train = ("train", "--model", "dense", "--data", str(kaggle_dir), "--epochs", "6", "--target", "1.0")
    failed = run_digits(*train, "--out", str(run_dir), env=shared_ray_env, timeout=300)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert failed.stderr.splitlines() == [
        f"digits: error: {run_dir}: No space left on device; the run can go on with "
        f"`digits train --resume {run_dir}` once there is room"
    ]
    assert not (run_dir / "run.json").exists() and not (run_dir / "model.keras").exists()

    grown = subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    resumed = run_digits("train", "--resume", str(run_dir), env=shared_ray_env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3, 4, 5, 6]  # none twice
    assert run["restarts"][-1]["kind"] == "resume" and (run_dir / "model.keras").is_file()

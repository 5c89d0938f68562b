"""End to end with the real tools: a Ray head started by cluster/local_cluster.sh (`ray start
--head`, token authentication on, dashboard on loopback), training and then scoring submitted
with the real `ray job submit` CLI and cluster/runtime_env.yaml, outputs on file:// URIs: the
code path of a multi-node cluster with shared storage. (A head alone: every extra node builds
the runtime env's virtualenv again, which would double this test's minutes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import AUTO_PRECISION_HERE, REPO, SLICE_TEST_ROWS
from tests.conftest import local_cluster as started_cluster

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def local_cluster():
    # A head alone with the CPUs, started without our environment: its workers get ours only
    # from the job.
    with started_cluster(0, without=("RAY_worker_niceness",), HEAD_CPUS="2") as env:
        yield env


def _ray_job(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", *args, "--address", f"http://127.0.0.1:{env['DASHBOARD_PORT']}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _submit(env: dict, job_id: str, *command: str, wait: bool = True) -> str:
    """Submits with the project's runtime env; unless told not to wait, waits for the end and
    requires SUCCEEDED. Right after `ray start` the head's job agent may not have registered
    yet; Ray answers that with a 500 that asks the client to try again, so a client does."""
    for _ in range(30):
        done = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{env['DASHBOARD_PORT']}",
                "--submission-id",
                job_id,
                "--runtime-env",
                "cluster/runtime_env.yaml",
                *([] if wait else ["--no-wait"]),
                "--",
                "python",
                "jobs/digits_job.py",
                *command,
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(2)
    if wait:
        _wait_succeeded(env, job_id, output=done.stdout + done.stderr)
    return done.stdout + done.stderr  # the job's own output, which the CLI follows


# Holds every CPU of the cluster with an actor until its stdin closes; on a line on stdin,
# prints how many jobs other than its own have actors or tasks waiting to be placed, once
# there are at least that many.
CPU_HOLDER = """
import sys, time
import ray
from ray.util.state import list_actors, list_tasks
ray.init(address=sys.argv[1], logging_level="ERROR")
state_api = sys.argv[2]  # named: with no address the state API refuses when it finds other Rays

@ray.remote
class Holder:
    def ready(self):
        return True

held = Holder.options(num_cpus=ray.cluster_resources()["CPU"]).remote()
ray.get(held.ready.remote())
print("holding", flush=True)
mine = ray.get_runtime_context().get_job_id()
wanted = int(sys.stdin.readline())
deadline = time.time() + 300
while time.time() < deadline:
    waiting = {a.job_id for a in list_actors(state_api, filters=[("state", "=", "PENDING_CREATION")])}
    waiting |= {t.job_id for t in list_tasks(state_api, filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")])}
    waiting.discard(mine)
    if len(waiting) >= wanted:
        break
    time.sleep(0.5)
print(len(waiting), flush=True)
sys.stdin.read()
"""


@contextmanager
def _holding_the_cpus(env: dict):
    """Every CPU of the cluster held by another client until the block ends; yields a function
    that waits (up to 5 minutes) for two jobs to have work waiting for CPUs, and returns how
    many do."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CPU_HOLDER,
            f"127.0.0.1:{env['RAY_PORT']}",
            f"http://127.0.0.1:{env['DASHBOARD_PORT']}",
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def waiting_jobs() -> int:
        holder.stdin.write("2\n")
        holder.stdin.flush()
        return int(holder.stdout.readline())

    try:
        assert holder.stdout.readline().strip() == "holding"
        yield waiting_jobs
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def _wait_succeeded(env: dict, job_id: str, output: str = "", timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        status = _ray_job(env, "status", job_id)
        said = status.stdout + status.stderr
        if f"Job '{job_id}' succeeded" in said:
            return
        if any(f"Job '{job_id}' {end}" in said for end in ("failed", "was stopped")) or time.time() > deadline:
            logs = _ray_job(env, "logs", job_id)
            raise AssertionError(said[-1000:] + (output or logs.stdout + logs.stderr)[-4000:])
        time.sleep(2)


@pytest.mark.timeout(900)
def test_train_then_score_through_ray_job_submit(local_cluster, tmp_path, kaggle_dir):
    env = local_cluster
    refused = _ray_job({k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, "list", timeout=60)
    assert refused.returncode != 0  # the Jobs API does not answer without the token

    run = f"file://{tmp_path}/run"
    # Also: a preset's settings, overridden by the options given, recorded in run.json;
    # augmentation, label smoothing and the cosine schedule under the strategy; and 2 workers
    # stopping together at the validation target.
    output = _submit(
        env,
        f"train-{os.getpid()}",
        "train",
        "--preset",
        "fast",
        "--model",
        "dense",
        "--workers",
        "2",
        "--batch-size",
        "32",
        "--augment",
        "--label-smoothing",
        "0.1",
        "--target",
        "0.5",
        "--data",
        f"file://{kaggle_dir}",
        "--out",
        run,
    )
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (
        summary["config"]
        | {
            "preset": "fast",
            "model": "dense",
            "batch_size": 32,
            "augment": True,
            "label_smoothing": 0.1,
            "lr_schedule": "cosine",
            "epochs": 3,
            "target_metric": "val_accuracy",
            "target": 0.5,
        }
        == summary["config"]
    )
    assert summary["stop_reason"] == "target reached at epoch 1 (val_accuracy >= 0.5)"
    assert summary["workers"] == 2 and summary["epochs_run"] == 1 and summary["shards"]["disjoint"]
    assert summary["worker_process"] == {
        "cpus": 1,
        "niceness": 0,  # not Ray's default 15
        "precision": AUTO_PRECISION_HERE,
    }
    assert "epoch 1/3  loss" in output and "target reached at epoch 1" in output  # rank 0's progress
    assert (tmp_path / "run" / "model.keras").is_file()

    # Two scoring jobs, each asking for both of the head's CPUs, submitted while another client
    # of the cluster holds them: both queue (what they wait to place is on record, and no output
    # is written), and once the CPUs are free both finish, one after the other.
    jobs = {f"predict-{os.getpid()}-{n}": tmp_path / f"scored{n}" for n in range(2)}
    with _holding_the_cpus(env) as waiting_jobs:
        for job_id, out in jobs.items():
            _submit(
                env,
                job_id,
                "predict",
                "--run",
                run,
                "--input",
                f"file://{kaggle_dir}/test.csv",
                "--out",
                f"file://{out}",
                "--actors",
                "1",
                "--cpus-per-actor",
                "2",
                wait=False,
            )
        assert waiting_jobs() == 2
        for job_id, out in jobs.items():
            assert "RUNNING" in _ray_job(env, "status", job_id).stdout
            assert not (out / "predict.json").exists() and not (out / "submission.csv").exists()
    for job_id in jobs:
        _wait_succeeded(env, job_id)
    first = jobs[f"predict-{os.getpid()}-0"]
    predictions = pd.read_parquet(first / "predictions")
    assert sorted(predictions["ImageId"]) == list(range(1, SLICE_TEST_ROWS + 1))
    submission = (first / "submission.csv").read_text().splitlines()
    assert submission[0] == "ImageId,Label" and len(submission) == SLICE_TEST_ROWS + 1
    for out in jobs.values():
        assert (out / "submission.csv").read_text().splitlines() == submission
        assert json.loads((out / "predict.json").read_text())["images"] == SLICE_TEST_ROWS
        assert not (out / "predict.underway").exists()

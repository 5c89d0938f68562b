"""Nodes that come and go, on a real multi-node Ray cluster (cluster/local_cluster.sh: a head
without CPUs and worker nodes of one CPU each, so a 2-worker run spans two nodes), with the
run directory on a real S3-protocol server on loopback: a node killed outright under an
elastic run and under a fixed-size one, and a preemption announced by `ray drain-node` and
carried out at its deadline; and a scoring run with an actor on each node. One cluster for the
module; each test leaves two worker nodes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, local_cluster, run_digits

RAY = str(Path(sys.executable).with_name("ray"))
SCRIPT = str(REPO / "cluster" / "local_cluster.sh")
# Epochs on 1-CPU nodes long enough that a kill after epoch 1's line lands in the middle of the
# run (the seed's CNN on the 2,000-row slice: a few seconds each). A preemption's run is
# longer: its deadline is set from epoch 2's time (`_preemption_deadline_s`), and the run must
# still be going then, whatever the machine's speed.
TRAIN = ("--model", "cnn", "--epochs", "4", "--target", "1.0")
PREEMPTED_EPOCHS = 8
TRAIN_LONGER = ("--model", "deep_cnn", "--epochs", str(PREEMPTED_EPOCHS), "--target", "1.0")


@pytest.fixture(scope="module")
def cluster(s3_server):
    with local_cluster(2, **s3_server.env) as env:
        yield env


def _script(env: dict, *args: str) -> str:
    done = subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def _live_workers(env: dict) -> list[str]:
    return sorted(Path(env["CLUSTER_STATE"]).glob("worker-*.session"), key=lambda p: p.name)


def _node_added(env: dict) -> None:
    """A worker node in place of the one a test took away."""
    _script(env, "add", "1")


def _train(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "digit_models.cli", "train", *args, "--address", f"127.0.0.1:{env['RAY_PORT']}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines_until(process: subprocess.Popen, prefix: str, timeout: float = 300) -> list[str]:
    """stdout's lines up to the first that starts with `prefix` (the run's next lines stay
    unread in the pipe)."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"no line starting {prefix!r}; saw {seen}")


def _run_json(s3_server, run: str) -> dict:
    path = run.removeprefix("s3://")
    with s3_server.filesystem().open_input_stream(f"{path}/run.json") as stream:
        return json.loads(stream.read())


def _attempts(s3_server, run: str) -> list[tuple[str, dict]]:
    import pyarrow.fs as pafs

    fs, path = s3_server.filesystem(), run.removeprefix("s3://") + "/attempts"
    found = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda info: info.base_name):
        with fs.open_input_stream(info.path) as stream:
            found.append((info.base_name.removesuffix(".json").partition("-")[2], json.loads(stream.read())))
    return found


def _preemption_deadline_s(epoch_line: str) -> int:
    """A deadline the notice comes well before (Ray Train looks for drains every 5 s, the
    workers ask every 32 steps: about an epoch of the slice) and that comes well before the
    run's end (PREEMPTED_EPOCHS - 2 epochs after the drain)."""
    epoch_s = float(re.search(r"  epoch ([0-9.]+)s  ", epoch_line).group(1))
    return max(8, round(4 + 3 * epoch_s))


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Error in control loop" not in stderr, stderr[-3000:]


@pytest.mark.timeout(900)
def test_a_preempted_node_costs_no_steps(cluster, s3_server, s3_kaggle):
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` with a deadline a few epochs away
    in epoch 3, the node killed at the deadline: the workers checkpoint in the middle of the epoch on the
    notice, and again before the deadline unless the first is already the last; they wait from
    the last, the restart counts as a preemption, and the new group resumes at that checkpoint's
    image, so no step is trained twice."""
    run = f"s3://{s3_server.bucket}/nodes/preempted"
    training = _train(
        cluster,
        *TRAIN_LONGER,
        "--workers",
        "2",
        "--min-workers",
        "1",
        "--data",
        s3_kaggle,
        "--out",
        run,
        "--max-failures",
        "0",
    )  # a restart counted as a failure fails the run
    deadline_s = _preemption_deadline_s(_lines_until(training, "epoch 2/")[-1])
    victim = _live_workers(cluster)[-1].stem
    node = _script(cluster, "node-id", victim)
    drained = subprocess.run(
        [
            RAY,
            "drain-node",
            "--address",
            f"127.0.0.1:{cluster['RAY_PORT']}",
            "--node-id",
            node,
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            "spot reclaim",
            "--deadline-remaining-seconds",
            str(deadline_s),
        ],
        env=cluster,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drained.returncode == 0, drained.stdout + drained.stderr
    time.sleep(deadline_s)
    _script(cluster, "kill", victim)
    stdout, stderr = training.communicate(timeout=600)
    _node_added(cluster)
    assert training.returncode == 0, stdout + stderr
    _no_traceback(stderr)
    summary = _run_json(s3_server, run)
    assert [entry["epoch"] for entry in summary["history"]] == list(range(1, PREEMPTED_EPOCHS + 1))
    assert summary["worker_groups"] == [2, 1], stdout
    [restart] = summary["restarts"]
    assert restart["kind"] == "preemption" and restart["workers"] == 1
    records = _attempts(s3_server, run)
    checkpoints = [entry for kind, entry in records if kind == "preemption"]
    assert checkpoints and checkpoints[0]["why"] == "notice" and len(checkpoints[0]["ranks"]) == 1
    assert checkpoints[-1]["last"] and not any(entry["last"] for entry in checkpoints[:-1])
    assert restart["resumed_at_image"] == checkpoints[-1]["images_done"]
    assert restart["resumed_after_epoch"] == checkpoints[-1]["epoch"] - 1
    then = "waiting for the node to go" if checkpoints[0]["last"] else "training on"
    assert any(
        line.startswith(f"preemption notice for worker(s) {checkpoints[0]['ranks'][0]}: checkpoint at ")
        and line.endswith(f", {then}")
        for line in stdout.splitlines()
    ), stdout


@pytest.mark.timeout(900)
def test_a_fixed_size_run_that_loses_a_node_waits_then_ends_resumable(cluster, s3_server, s3_kaggle):
    """--workers 2 without --min-workers, one node killed: a console line at once, the bounded
    wait, exit 1 with one line that says how to go on, and a --resume that finishes once the
    cluster has its nodes again."""
    run = f"s3://{s3_server.bucket}/nodes/fixed"
    training = _train(cluster, *TRAIN, "--workers", "2", "--data", s3_kaggle, "--out", run, "--wait-for-workers", "10")
    _lines_until(training, "epoch 1/")
    _script(cluster, "kill", _live_workers(cluster)[-1].stem)
    killed = time.time()
    said = _lines_until(training, "the 2-worker group failed", timeout=120)[-1]
    assert "waiting at most 10 s for 2 workers" in said and time.time() - killed < 30
    stdout, stderr = training.communicate(timeout=300)
    assert training.returncode == 1, stdout + stderr
    assert stderr.strip().splitlines() == [
        f"digits: fewer than 2 worker(s) could start for {stderr.split('start for ')[1].split(' s')[0]} s "
        f"(--wait-for-workers 10); continue with `digits train --resume {run}` once the cluster has "
        "the nodes, or train with a smaller --min-workers"
    ], stderr
    _node_added(cluster)  # a fixed-size group asks Ray for its workers and waits for them
    resumed = run_digits("train", "--resume", run, "--address", f"127.0.0.1:{cluster['RAY_PORT']}", env=cluster)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _no_traceback(resumed.stderr)
    summary = _run_json(s3_server, run)
    assert [entry["epoch"] for entry in summary["history"]] == [1, 2, 3, 4]
    assert summary["worker_groups"][0] == summary["worker_groups"][-1] == 2
    assert summary["restarts"][-1]["kind"] == "resume"
    assert [kind for kind, _ in _attempts(s3_server, run)].count("waiting") >= 1


@pytest.mark.timeout(900)
def test_an_elastic_run_goes_on_without_a_lost_node(cluster, s3_server, s3_kaggle):
    """--workers 2 --min-workers 1, one worker node killed in epoch 2: the run finishes every
    epoch once, those after the kill on one worker, with the group sizes on record."""
    run = f"s3://{s3_server.bucket}/nodes/elastic"
    training = _train(cluster, *TRAIN, "--workers", "2", "--min-workers", "1", "--data", s3_kaggle, "--out", run)
    _lines_until(training, "epoch 1/")
    _script(cluster, "kill", _live_workers(cluster)[-1].stem)
    stdout, stderr = training.communicate(timeout=600)
    _node_added(cluster)
    assert training.returncode == 0, stdout + stderr
    _no_traceback(stderr)
    summary = _run_json(s3_server, run)
    assert [entry["epoch"] for entry in summary["history"]] == [1, 2, 3, 4]
    assert summary["worker_groups"] == [2, 1] and summary["workers"] == 1, stdout
    assert summary["global_batch_size"] == 32 and summary["shards"]["train_rows"] == [1792]
    [restart] = summary["restarts"]
    assert restart["kind"] == "failure" and restart["workers"] == 1 and restart["resumed_after_epoch"] >= 1
    assert "workers restarted after a failure (restart 1 of this run)" in stdout
    assert "with 1 of 2 workers" in stdout


def test_scoring_spreads_its_actors_over_the_nodes_and_keeps_the_files_on_the_drivers(cluster, tmp_path, dense_scored):
    """Two 1-CPU actors on a cluster of two 1-CPU nodes (the head has none): one on each node,
    the model's bytes carried to both through the object store, the reads and writes of local
    files on the driver's node (every node of this one machine could reach them, so this shows
    the pipeline across nodes, not where its reads ran), and the predictions those of a scoring
    on one node."""
    record = json.loads((dense_scored / "predict.json").read_text())
    out = tmp_path / "scored"
    done = run_digits(
        "predict",
        "--run",
        record["runs"][0],
        "--input",
        record["input"],
        "--out",
        str(out),
        "--actors",
        "2",
        "--cpus-per-actor",
        "1",
        "--address",
        f"127.0.0.1:{cluster['RAY_PORT']}",
        env=cluster,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _no_traceback(done.stderr)
    spread = json.loads((out / "predict.json").read_text())
    assert spread["nodes"] == 3 and spread["actors"] == 2 and spread["images"] == record["images"]
    here = pd.read_parquet(out / "predictions").sort_values("ImageId", ignore_index=True)
    alone = pd.read_parquet(dense_scored / "predictions").sort_values("ImageId", ignore_index=True)
    assert here["ImageId"].tolist() == alone["ImageId"].tolist()
    assert here["Label"].tolist() == alone["Label"].tolist()
    assert np.allclose(here.filter(like="prob_"), alone.filter(like="prob_"), atol=1e-5)
    assert (out / "submission.csv").read_bytes() == (dense_scored / "submission.csv").read_bytes()

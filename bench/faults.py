"""`python -m bench.faults`: what a killed training worker, a lost node and a preempted node cost.

Two 2-worker runs of the seed's CNN, side by side in one invocation: one undisturbed, one whose
workers are killed four times (DIGITS_FAULT: halfway through an epoch's steps, as validation
begins, between rank 0's checkpoint save and its upload, right after an epoch's report). From
the run's attempts/ record and the epochs' end times: for each kill, the work thrown away (since
the last checkpointed epoch ended), and the time from the kill until the new worker group had
loaded its checkpoint. Prints a Markdown table.

Then, on a local multi-node cluster (cluster/local_cluster.sh: worker nodes of one CPU each),
three elastic runs (`--workers 2 --min-workers 1`) side by side: one undisturbed; one whose
second worker node is killed outright after epoch 1 (a dead machine); one whose node gets a
preemption notice after epoch 1 (`ray drain-node` with a 20 s deadline) and is killed at the
deadline. For each: the wall time, the time from the event to the new worker group's start,
and, for the preemption, when the notice's checkpoint came and the steps trained after the
last checkpoint, which the restart throws away. And what asking for a notice costs: the
undisturbed run's seconds per question against its steps' time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.processes import PYTHON, REPO, Processes, local_cluster
from digit_models.training import attempts

KILLS = ("mid_epoch:2:1", "validation:3:1", "checkpoint:4:0", "after_epoch:5:1")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--limit", type=int, default=12_000, help="training rows (default 12,000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="digits-bench-faults-") as scratch:
        run = Processes(Path(scratch))
        common = (
            "train",
            "--model",
            "cnn",
            "--data",
            args.data,
            "--limit",
            str(args.limit),
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
        )
        clean_s = run.digits(*common, "--out", f"{scratch}/clean")
        faulted_s = run.digits(*common, "--out", f"{scratch}/faulted", env={"DIGITS_FAULT": ",".join(KILLS)})
        peak = run.arithmetic("cnn")["peak_gflops"]
        print(f"Machine: float32 matmul peak {peak:.0f} GFLOP/s.")
        print(table(Path(scratch, "faulted"), clean_s, faulted_s))
        print()
        print(node_table(Path(scratch), args.data, args.limit))


def node_table(scratch: Path, data: str, limit: int) -> str:
    with local_cluster(6393) as cluster:
        common = (
            "--model",
            "cnn",
            "--data",
            data,
            "--limit",
            str(limit),
            "--workers",
            "2",
            "--min-workers",
            "1",
            "--epochs",
            "4",
            "--target",
            "1.0",
        )
        runs = {
            name: _node_run(cluster, scratch / name, common, event)
            for name, event in (("undisturbed", None), ("node killed", _kill), ("preempted", _preempt))
        }
    clean = json.loads((scratch / "undisturbed" / "run.json").read_text())
    checks = clean["preemption_checks"]
    images_per_s = sorted(entry["images_per_s"] for entry in clean["history"][1:])[len(clean["history"]) // 2 - 1]
    step_s = clean["global_batch_size"] / images_per_s  # a median epoch's, after the first's tracing
    per_check_s = checks["check_s"] / max(checks["checks"], 1)
    lines = [
        f"Seed CNN, `--workers 2 --min-workers 1` on two 1-CPU worker nodes, "
        f"{clean['data']['train_rows']:,} training rows, 4 epochs. A question for a preemption "
        f"notice costs {per_check_s * 1000:.1f} ms every {checks['every_steps']} steps of "
        f"{step_s * 1000:.0f} ms: {per_check_s / (checks['every_steps'] * step_s):.2%} of a step.",
        "",
        "| run | wall | groups | event to new group | resumed at | steps thrown away |",
        "|---|---|---|---|---|---|",
    ]
    for name, (wall_s, event_at) in runs.items():
        summary = json.loads((scratch / name / "run.json").read_text())
        records = attempts.timeline(str(scratch / name))
        starts = [at for at, kind, _ in records if kind == "start"]
        restart = summary["restarts"][0] if summary["restarts"] else None
        to_group = f"{starts[1] - event_at:.1f} s" if event_at and len(starts) > 1 else "-"
        where = (
            f"epoch {restart['resumed_after_epoch'] + 1}, image {restart['resumed_at_image']:,}"
            if restart and restart["resumed_at_image"]
            else f"after epoch {restart['resumed_after_epoch']}"
            if restart
            else "-"
        )
        lines.append(
            f"| {name} | {wall_s:.0f} s | {' -> '.join(map(str, summary['worker_groups']))} "
            f"| {to_group} | {where} | {_thrown_away(records, summary)} |"
        )
    return "\n".join(lines)


def _thrown_away(records, summary: dict) -> str:
    """Steps of the ended group past the checkpoint the new one resumed from: none when the
    last preemption checkpoint was the deadline's (the workers wait after it); else its
    images/s times the seconds from that checkpoint to the group's end."""
    checkpoints = [(at, entry) for at, kind, entry in records if kind == "preemption"]
    if not checkpoints:
        return "-"
    at, last = checkpoints[-1]
    if last["why"] == "deadline":
        return "0"
    ended = next(at_end for at_end, kind, _ in records if kind == "restart" and at_end >= at)
    images_per_s = max(entry["images_per_s"] for entry in summary["history"])
    global_batch = summary["batch_size_per_worker"] * summary["accumulate"] * summary["worker_groups"][0]
    return f"at most {(ended - at) * images_per_s / global_batch:.0f} ({ended - at:.1f} s)"


def _node_run(cluster: dict, out: Path, common: tuple, event) -> tuple[float, float | None]:
    """A training run on the cluster; `event(cluster)` after epoch 1's line, returning when
    it struck. Returns the wall time and that moment, and leaves the cluster two worker nodes."""
    env = {**os.environ, **cluster}
    began = time.time()
    training = subprocess.Popen(
        [PYTHON, "-m", "digit_models.cli", "train", *common, "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    event_at = None
    if event:
        for line in training.stdout:
            if line.startswith("epoch 1/"):
                event_at = event(env)
                break
    _, stderr = training.communicate()
    if training.returncode != 0:
        sys.exit(f"bench: a run on the cluster failed:\n{stderr[-3000:]}")
    if event:
        _cluster_script(env, "add", "1")
    return time.time() - began, event_at


def _cluster_script(env: dict, *args: str) -> str:
    return subprocess.run(
        [str(REPO / "cluster" / "local_cluster.sh"), *args], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def _last_worker(env: dict) -> str:
    return sorted(Path(env["CLUSTER_STATE"]).glob("worker-*.session"))[-1].stem


def _kill(env: dict) -> float:
    _cluster_script(env, "kill", _last_worker(env))
    return time.time()


def _preempt(env: dict) -> float:
    victim = _last_worker(env)
    node = _cluster_script(env, "node-id", victim)
    subprocess.run(
        [
            str(Path(env["RAY"])),
            "drain-node",
            "--address",
            env["RAY_ADDRESS"],
            "--node-id",
            node,
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            "spot reclaim",
            "--deadline-remaining-seconds",
            "20",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    time.sleep(20)
    _cluster_script(env, "kill", victim)
    return time.time()


def table(run_dir: Path, clean_s: float, faulted_s: float) -> str:
    run = json.loads((run_dir / "run.json").read_text())
    ended = {entry["epoch"]: entry["ended_unix"] for entry in run["history"]}
    epoch_s = sorted(entry["epoch_s"] for entry in run["history"])[len(run["history"]) // 2]
    records = attempts.timeline(str(run_dir))
    faults = [at for at, kind, _ in records if kind == "fault"]
    starts = [at for at, kind, _ in records if kind == "start"][1:]
    lines = [
        f"Seed CNN, 2 workers, {run['data']['train_rows']:,} training rows; a median epoch "
        f"{epoch_s:.1f} s. Undisturbed run {clean_s:.0f} s, with the {len(KILLS)} kills "
        f"{faulted_s:.0f} s (+{faulted_s - clean_s:.0f} s).",
        "",
        "| worker killed | resumed after epoch | work lost | kill to new group ready |",
        "|---|---|---|---|",
    ]
    for spec, fault_at, start_at, restart in zip(KILLS, faults, starts, run["restarts"]):
        resumed = restart["resumed_after_epoch"]
        lost = max(0.0, fault_at - ended[resumed]) if resumed else None
        lost_text = "-" if lost is None else f"{lost:.1f} s ({lost / epoch_s:.2f} epoch)"
        lines.append(
            f"| {spec.split(':')[0].replace('_', ' ')} of epoch {spec.split(':')[1]} "
            f"| {resumed} | {lost_text} | {start_at - fault_at:.1f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""`python -m bench.faults`: what a killed training worker costs, in epochs and seconds.

Two 2-worker runs of the seed's CNN, side by side in one invocation: one undisturbed, one whose
workers are killed four times (DIGITS_FAULT: halfway through an epoch's steps, as validation
begins, between rank 0's checkpoint save and its upload, right after an epoch's report). From
the run's attempts/ record and the epochs' end times: for each kill, the work thrown away (since
the last checkpointed epoch ended), and the time from the kill until the new worker group had
loaded its checkpoint. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.processes import REPO, Processes
from digit_models import attempts

KILLS = ("mid_epoch:2:1", "validation:3:1", "checkpoint:4:0", "after_epoch:5:1")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--limit", type=int, default=12_000, help="training rows (default 12,000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="digits-bench-faults-") as scratch:
        run = Processes(Path(scratch))
        common = ("train", "--model", "cnn", "--data", args.data, "--limit", str(args.limit),
                  "--workers", "2", "--epochs", "6", "--max-failures", "4",
                  "--target-metric", "val_accuracy", "--target", "1.0")
        clean_s = run.digits(*common, "--out", f"{scratch}/clean")
        faulted_s = run.digits(*common, "--out", f"{scratch}/faulted", env={"DIGITS_FAULT": ",".join(KILLS)})
        peak = run.arithmetic("cnn")["peak_gflops"]
        print(f"Machine: float32 matmul peak {peak:.0f} GFLOP/s.")
        print(table(Path(scratch, "faulted"), clean_s, faulted_s))


def table(run_dir: Path, clean_s: float, faulted_s: float) -> str:
    run = json.loads((run_dir / "run.json").read_text())
    ended = {entry["epoch"]: entry["ended_unix"] for entry in run["history"]}
    epoch_s = sorted(entry["epoch_s"] for entry in run["history"])[len(run["history"]) // 2]
    records = attempts.timeline(str(run_dir))
    faults = [at for at, kind, _ in records if kind == "fault"]
    starts = [at for at, kind, _ in records if kind == "start"][1:]
    lines = [f"Seed CNN, 2 workers, {run['data']['train_rows']:,} training rows; a median epoch "
             f"{epoch_s:.1f} s. Undisturbed run {clean_s:.0f} s, with the {len(KILLS)} kills "
             f"{faulted_s:.0f} s (+{faulted_s - clean_s:.0f} s).", "",
             "| worker killed | resumed after epoch | work lost | kill to new group ready |",
             "|---|---|---|---|"]
    for spec, fault_at, start_at, restart in zip(KILLS, faults, starts, run["restarts"]):
        resumed = restart["resumed_after_epoch"]
        lost = max(0.0, fault_at - ended[resumed]) if resumed else None
        lost_text = "-" if lost is None else f"{lost:.1f} s ({lost / epoch_s:.2f} epoch)"
        lines.append(f"| {spec.split(':')[0].replace('_', ' ')} of epoch {spec.split(':')[1]} "
                     f"| {resumed} | {lost_text} | {start_at - fault_at:.1f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

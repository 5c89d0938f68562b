"""The training input at 1x, 10x and 100x train.csv: how the driver's memory, the object store and
what the training worker maps from it grow with the rows.

train.csv's rows repeated (the header once) to each size, in the scratch folder, one file at a
time (4.2 million rows are 3.3 GB of CSV), deleted after its run. Each size: `digits train
--workers 1` of the dense net for one epoch at batch 1024 on an embedded Ray, no validation
split, measured by bench/footprint.py's reading of /proc: the driver's peak RSS, peak private
memory (a chunk of rows at a time, on its way to the spool on disk) and peak shared memory (the
object store is shared memory: what the driver mapped of it; the raylet that hosts the store
touches none of it), the peak private and shared memory of the task that puts the rows from
the spool into the store (on the driver's node: a part at a time, and the store's pages it
wrote), and the worker's peak shared memory (the
objects it has mapped from the store: on one node a zero-copy read of every row) and private
memory (the rows joined into the one array it trains from). Each size's Ray footprint comes too (bench/footprint.py).
A size whose driver would not fit in the memory available (projected from the sizes before it)
is not run, and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench import footprint

# A row as the driver holds it: 784 uint8 pixels and a uint8 label.
ROW_BYTES = 785
# A size runs only if the driver's projected peak fits in this share of the memory available:
# the machine is shared, and a driver that does not fit brings in the kernel's OOM killer.
MEMORY_SHARE = 0.6
TRAINING = ["--model", "dense", "--epochs", "1", "--batch-size", "1024", "--val-fraction", "0", "--target", "1.0"]


def repeated_csv(train_csv: Path, times: int, target: Path) -> None:
    """train.csv with its rows `times` over."""
    with open(train_csv, "rb") as source:
        header, body = source.readline(), source.read()
    with open(target, "wb") as out:
        out.write(header)
        for _ in range(times):
            out.write(body)


def scale(train_csv: Path, scratch: Path, times: list[int], env: dict | None = None) -> list[dict]:
    rows: list[dict] = []
    rows_once = train_csv.read_bytes().count(b"\n") - 1  # less the header
    for factor in times:
        count = rows_once * factor
        projected = _projected_driver_mb(rows, count)
        available = _available_mb()
        if projected > available * MEMORY_SHARE:
            rows.append(
                {
                    "rows": count,
                    "data_mb": count * ROW_BYTES / 2**20,
                    "not_run": f"the driver would need about {projected / 1024:,.1f} GB (its peak RSS per row "
                    f"so far), {available / 1024:,.1f} GB available",
                }
            )
            continue
        data = scratch / f"train-x{factor}.csv"
        run_dir = scratch / f"input-x{factor}"
        repeated_csv(train_csv, factor, data)
        try:
            result = footprint.train(data, run_dir, TRAINING, env)
        finally:
            os.remove(data)
        memory = result["memory_mb_by_class"]
        worker = memory.get("ray::RayTrainWorker", {})
        putter = memory.get("ray::split_parts", {})
        run = json.loads((run_dir / "run.json").read_text())
        rows.append(
            {
                "rows": count,
                "data_mb": count * ROW_BYTES / 2**20,
                "wall_s": result["wall_s"],
                "images_per_s": run["history"][-1]["images_per_s"],
                "driver_peak_rss_mb": memory["driver"]["peak_rss_mb"],
                "driver_peak_shared_mb": memory["driver"]["peak_shared_mb"],
                "driver_peak_private_mb": memory["driver"]["peak_private_mb"],
                # None where the task began and ended between two readings of /proc
                "putter_peak_private_mb": putter.get("peak_private_mb"),
                "putter_peak_shared_mb": putter.get("peak_shared_mb"),
                "worker_peak_shared_mb": worker.get("peak_shared_mb", 0.0),
                "worker_peak_private_mb": worker.get("peak_private_mb", 0.0),
                "worker_peak_rss_mb": worker.get("peak_rss_mb", 0.0),
                "footprint": footprint.summary([result]),
            }
        )
    return rows


def _projected_driver_mb(measured: list[dict], rows: int) -> float:
    """The driver's peak RSS at `rows`, on the line through the two largest sizes measured (the
    rows it read, then put into the store; its imports are the constant); 0 before two are
    measured."""
    done = [size for size in measured if "not_run" not in size]
    if len(done) < 2:
        return 0.0
    small, large = done[-2], done[-1]
    per_row = (large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"]) / (large["rows"] - small["rows"])
    return large["driver_peak_rss_mb"] + per_row * (rows - large["rows"])


def _available_mb() -> float:
    """MemAvailable of /proc/meminfo, in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")

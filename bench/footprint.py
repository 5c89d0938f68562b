"""Ray's own footprint: the CPU seconds of an embedded Ray's processes during a `digits` command.

The command runs in a fresh process with an embedded Ray (RAY_ADDRESS dropped); every half
second the harness reads /proc for that process and all its descendants (Ray's GCS, raylet,
dashboard and agents, log monitor and workers are its children or theirs, and a process once seen
is followed when re-parented), and keeps each process's utime + stime and its title. Processes
are then sorted by title into ours (the driver, the training workers and Ray Data's tasks and
actors that read, score and write our data) and Ray's (everything else: the GCS, raylet, the
dashboard and its modules, the agents, the monitors, idle workers, Ray Train's controller, Ray
Data's coordinator actors). A process's CPU after its last reading (at most half a second's) is
lost, so Ray's seconds are if anything low by that.

Training: `--workers 1` with every CPU; Ray's share of the machine is given over the whole
command and over its training (first step to the end of its last epoch, from run.json's timeline).
Scoring: `digits predict` of test.csv with 1 actor, over the whole command.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench.processes import PYTHON, REPO

SAMPLE_S = 0.5
# Peaks kept of each process (/proc/PID/status): its peak resident set, and the largest its
# private and its shared-memory pages have been. Ray's object store is shared memory: the
# raylet's shared pages are the store in use on its node, a worker's the objects it has mapped.
MEMORY = {"peak_rss_mb": "VmHWM", "peak_private_mb": "RssAnon", "peak_shared_mb": "RssShmem"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Titles of our own work, by prefix (Ray names a worker process `ray::<actor or task>`); a
# worker that ran one of these at any reading is ours for its whole life.
DRIVER = "driver"
OURS = (
    "ray::RayTrainWorker",
    "ray::split_parts",
    "ray::MapWorker",
    "ray::ReadCSV",
    "ray::ReadParquet",
    "ray::Write",
    "ray::Map",
)


def measure(args: list[str], env: dict) -> dict:
    """Runs `digits ARGS` with an embedded Ray, sampling its process tree; returns the wall
    time, the CPU seconds of each class of process, and the time series of Ray's CPU seconds."""
    env = {name: value for name, value in {**os.environ, **env}.items() if name != "RAY_ADDRESS"}
    began = time.time()
    command = subprocess.Popen(
        [PYTHON, "-m", "digit_models.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes: dict[tuple[int, int], dict] = {}  # (pid, start tick) -> class, cpu_s
    series = []  # (seconds since launch, CPU seconds so far of each class)
    while command.poll() is None:
        read_tree(command.pid, processes)
        series.append((time.time() - began, by_class(processes)))
        time.sleep(SAMPLE_S)
    wall = time.time() - began
    stderr = command.stderr.read() if command.stderr else ""
    if command.returncode != 0:
        raise SystemExit(f"bench: `digits {' '.join(args)}` failed:\n{stderr[-3000:]}")
    cpu_s_by_class = by_class(processes)
    ray_s = _ray_cpu_s(cpu_s_by_class)
    memory: dict[str, dict[str, float]] = {}  # class -> the largest of each peak among its processes
    for process in processes.values():
        peaks = memory.setdefault(process["class"], dict.fromkeys(MEMORY, 0.0))
        for name in MEMORY:
            peaks[name] = max(peaks[name], process[name])
    return {
        "launched_unix": began,
        "wall_s": wall,
        "ray_cpu_s": ray_s,
        "ours_cpu_s": sum(cpu_s_by_class.values()) - ray_s,
        "ray_share": ray_s / (wall * os.cpu_count()),
        "cpu_s_by_class": cpu_s_by_class,
        "memory_mb_by_class": memory,
        "series": series,
    }


def read_tree(root: int, processes: dict) -> None:
    """Adds or updates every descendant of `root` (and root) found in /proc now."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat:
                stats[int(entry)] = stat
    followed = {pid for pid, start in processes} | {root}
    grew = True
    while grew:  # descendants: children of a followed process, to any depth
        found = {pid for pid, (parent, _, _) in stats.items() if parent in followed}
        grew = not found <= followed
        followed |= found
    for pid in followed & stats.keys():
        _, start, cpu_s = stats[pid]
        title = _title(pid)
        known = processes.setdefault((pid, start), {"class": "unnamed", "cpu_s": 0.0, **dict.fromkeys(MEMORY, 0.0)})
        known["cpu_s"] = max(known["cpu_s"], cpu_s)
        for name, megabytes in _memory(pid).items():
            known[name] = max(known[name], megabytes)
        if title is not None and not _is_ours(known["class"]):
            known["class"] = DRIVER if pid == root else _class(title)


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, start tick, utime + stime in seconds), or None if it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _memory(pid: int) -> dict[str, float]:
    """MEMORY's figures of the process now, in MB (none if it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {name: int(fields[field].split()[0]) / 1024 for name, field in MEMORY.items() if field in fields}


def _title(pid: int) -> str | None:
    """The process's command line as Ray sets it; None if it has gone or has none (a zombie)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    return title or None


def _class(title: str) -> str:
    """A short name for what the process is, from its title."""
    if title.startswith("ray::"):
        return title.split()[0].split("(")[0].split(".")[0]
    for needle, name in (
        ("gcs_server", "GCS"),
        ("raylet", "raylet"),
        ("runtime_env/agent", "runtime env agent"),
        ("dashboard/agent.py", "dashboard agent"),
        ("ray-dashboard-", "dashboard module"),
        ("dashboard/dashboard.py", "dashboard"),
        ("log_monitor.py", "log monitor"),
        ("autoscaler/_private/monitor.py", "autoscaler monitor"),
        ("from multiprocessing.", "dashboard's process starter"),
    ):
        if needle in title:
            return name
    return title.split()[0].rsplit("/", 1)[-1]


def _is_ours(name: str) -> bool:
    return name == DRIVER or name.startswith(OURS)


def by_class(processes: dict) -> dict[str, float]:
    """CPU seconds of each class of process, the largest first."""
    totals: dict[str, float] = {}
    for process in processes.values():
        totals[process["class"]] = totals.get(process["class"], 0.0) + process["cpu_s"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _ray_cpu_s(by_class: dict[str, float]) -> float:
    return sum(cpu_s for name, cpu_s in by_class.items() if not _is_ours(name))


def _window(series: list, start_s: float, end_s: float) -> dict | None:
    """Ray's share of the machine's CPU, and each class's CPU seconds per minute, between two
    moments of the command (seconds after its launch), from the first and last readings inside."""
    inside = [(at, by_class) for at, by_class in series if start_s <= at <= end_s]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
        return None
    (first_at, first), (last_at, last) = inside[0], inside[-1]
    grown = {name: cpu_s - first.get(name, 0.0) for name, cpu_s in last.items()}
    return {
        "seconds": last_at - first_at,
        "ray_share": _ray_cpu_s(grown) / ((last_at - first_at) * os.cpu_count()),
        "cpu_s_per_minute_by_class": {
            name: cpu_s / (last_at - first_at) * 60 for name, cpu_s in grown.items() if cpu_s > 0
        },
    }


def training(data: Path, scratch: Path, repeats: int, args: list[str], env: dict | None = None) -> dict:
    """`digits train --workers 1` ARGS on an embedded Ray, `repeats` times."""
    return summary([train(data, scratch / f"footprint-train-{time.time_ns()}", args, env) for _ in range(repeats)])


def train(data: Path, run_dir: Path, args: list[str], env: dict | None = None) -> dict:
    """One `digits train --workers 1` ARGS on an embedded Ray into run_dir, measured, with the
    share of the machine Ray's processes took during its epochs."""
    result = measure(["train", "--data", str(data), "--out", str(run_dir), "--workers", "1", *args], env or {})
    run = json.loads((run_dir / "run.json").read_text())
    offset = run["timeline_origin_unix"] - result["launched_unix"]
    training_window = (offset + run["timeline"]["first_step"], offset + run["timeline"]["training_ended"])
    return {**result, "training": _window(result["series"], *training_window), "run_dir": str(run_dir)}


def scoring(run_dir: Path, test_csv: Path, scratch: Path, repeats: int, env: dict | None = None) -> dict:
    """`digits predict` of test_csv with 1 actor on an embedded Ray, `repeats` times."""
    runs = []
    for repeat in range(repeats):
        out = scratch / f"footprint-predict-{repeat}-{time.time_ns()}"
        args = ["predict", "--run", str(run_dir), "--input", str(test_csv), "--out", str(out), "--actors", "1"]
        runs.append(measure(args, env or {}))
    return summary(runs)


def summary(runs: list[dict]) -> dict:
    """The medians of measured runs, and the runs without their time series."""
    medians = {
        key: statistics.median(run[key] for run in runs) for key in ("wall_s", "ray_cpu_s", "ours_cpu_s", "ray_share")
    }
    shares = [run["training"]["ray_share"] for run in runs if run.get("training")]
    if shares:
        medians["ray_share_training"] = statistics.median(shares)
    medians["ray_cpu_s_per_minute"] = medians["ray_cpu_s"] / medians["wall_s"] * 60
    return {**medians, "runs": [{k: v for k, v in run.items() if k != "series"} for run in runs]}

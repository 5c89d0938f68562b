"""A search's records in TUNE_DIR: the results table (results.csv and results.json, a row per
trial) and best.json (the best finished trial and a `digits train` command line that trains it
again). Each is rewritten whole, atomically, whenever a trial ends and when the search stops.

A trial's numbers are its run directory's (run.json, or its newest complete checkpoint while it
is unfinished), so the table says what `digits runs TUNE_DIR/trials` and `digits predict` find
there; what Ray Tune alone knows is its state (stopped early, failed) and its time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shlex

from digit_models.config import TrainConfig
from digit_models.storage.files import Folder
from digit_models.storage.run_dir import RunDir
from digit_models.training.runs import describe
from digit_models.tuning.space import option

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
BEST = "best.json"

# The table's columns around the trial's options (one column each, named as the option).
FIRST = ("trial", "state")
LAST = ("epochs", "val_accuracy", "best_val_accuracy", "best_epoch", "stop_reason", "wall_s", "run_dir", "error")


def trial_row(name: str, state: str, sampled: dict, run: RunDir, wall_s: float | None, error: str | None) -> dict:
    """A trial's row: `state` as the search knows it (finished, stopped early, failed,
    running, pending, unfinished), `sampled` its options (TrainConfig fields), `wall_s` Ray
    Tune's time from the trial's start to its last epoch (a finished run's own is run.json's)."""
    numbers = describe(run) if run.exists(RunDir.STARTED) or run.is_finished else {}
    if numbers.get("state") == "finished":
        state, wall_s = "finished", run.read_run()["wall_s"]
    return {
        "trial": name,
        "state": state,
        **{option(field): value for field, value in sampled.items()},
        "epochs": numbers.get("epochs_run"),
        "val_accuracy": numbers.get("val_accuracy"),
        "best_val_accuracy": numbers.get("best_val_accuracy"),
        "best_epoch": numbers.get("best_epoch"),
        "stop_reason": numbers.get("stop_reason"),
        "wall_s": round(wall_s, 1) if wall_s is not None else None,
        "run_dir": f"trials/{name}",
        "error": error,
    }


def best_trial(rows: list[dict], tune_dir: Folder, fixed: dict) -> dict | None:
    """best.json's content: the finished trial whose model (its last epoch's) has the highest
    val_accuracy (the earlier trial on a tie), with its settings and a command line that trains
    them again; None before any trial has finished."""
    finished = [row for row in rows if row["state"] == "finished" and row["val_accuracy"] is not None]
    if not finished:
        return None
    best = min(finished, key=lambda row: (-row["val_accuracy"], row["trial"]))
    run = RunDir(tune_dir.child(best["run_dir"]))
    config = run.read_run()["config"]
    return {
        "trial": best["trial"],
        "run_dir": run.given,
        "val_accuracy": best["val_accuracy"],
        "best_val_accuracy": best["best_val_accuracy"],
        "epochs": best["epochs"],
        "config": config,
        "command": train_command(config, fixed),
    }


def train_command(config: dict, fixed: dict) -> str:
    """`digits train` with every setting of a trial's run.json that is not the default, so that
    it trains the same run without the preset (a preset's switch turned off by the trial, such
    as `augment`, has no option of its own). Left out: the output (`runs/tuned`, to change),
    and the CPUs per worker unless fixed for the search (they were a share of its CPUs)."""
    defaults = dataclasses.asdict(TrainConfig())
    left_out = {"data", "out", "preset"} | ({"cpus_per_worker"} - set(fixed))
    words = ["digits", "train", "--data", config["data"], "--out", "runs/tuned"]
    for field, value in config.items():
        if field in left_out or field not in defaults or value is None or value == defaults[field]:
            continue
        words.append(f"--{option(field)}")
        if value is not True:
            words.append(f"{value:g}" if isinstance(value, float) else str(value))
    return shlex.join(words)


def write_results(tune_dir: Folder, rows: list[dict], fixed: dict) -> dict | None:
    """results.csv, results.json and (once a trial has finished) best.json; returns best.json's
    content."""
    columns = list(FIRST) + sorted({key for row in rows for key in row} - set(FIRST) - set(LAST)) + list(LAST)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tune_dir.write_text(RESULTS_CSV, text.getvalue())
    tune_dir.write_json(RESULTS_JSON, rows)
    best = best_trial(rows, tune_dir, fixed)
    if best:
        tune_dir.write_json(BEST, best)
    return best

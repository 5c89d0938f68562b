"""Training benchmarks: what a second worker adds, where a step's time goes, how long until the
first step, and `digits train` against the seed's plain Keras script.

- weak scaling: images/s of 2 workers x 1 CPU over twice that of 1 worker x 1 CPU, the same
  per-worker batch (the epochs after the first);
- overhead: the seed's plain Keras script (a) against `digits train` with 1 worker and every
  CPU (b), the seed's batch 32, no validation split (the seed has none);
- time to 99% validation accuracy, `--preset fast`, 1 worker x 1 CPU against 2 x 1 CPU;
- a step's parts and start-up stages: bench/probes.py `steps`, and run.json's timeline.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

from bench.processes import Processes, local_cluster


class Trainer:
    """`digits train` runs into fresh run directories of the scratch folder."""

    def __init__(self, run: Processes, data: Path, limit: int | None, name: str = "run"):
        self.run, self.data, self.limit, self.name = run, data, limit, name  # name: of its run directories
        self.numbers = itertools.count(1)  # of the run directories; runs may be started from threads
        self.by_model: dict[str, Path] = {}  # the latest run directory of each --model given

    def latest(self, model: str) -> Path | None:
        """The run directory of the latest run given `--model MODEL`, if any."""
        return self.by_model.get(model)

    def train(self, *args: str, env: dict | None = None) -> tuple[dict, float, Path]:
        """Returns run.json, the wall time and the run directory."""
        run_dir = self.run.scratch / f"{self.name}-{next(self.numbers)}"
        limit = ["--limit", str(self.limit)] if self.limit else []
        launched = time.time()
        wall = self.run.digits("train", "--data", str(self.data), "--out", str(run_dir), *limit, *args, env=env)
        run = json.loads((run_dir / "run.json").read_text())
        run["first_step_after_launch_s"] = run["timeline_origin_unix"] + run["timeline"]["first_step"] - launched
        if "--model" in args:
            self.by_model[args[args.index("--model") + 1]] = run_dir
        return run, wall, run_dir


ONE_CPU = ["--cpus-per-worker", "1"]
QUICK_TO_TARGET = ["--epochs", "1", "--model", "dense", "--target", "0.05"]


def weak_scaling(trainer: Trainer, setups: list[tuple[str, int, int]], epochs: int, repeats: int) -> dict:
    """Per (model, batch, accumulate): 1 worker x 1 CPU against 2 workers x 1 CPU."""
    fixed = ["--epochs", str(epochs), "--val-fraction", "0", "--target", "1.0"]
    samples: dict = {}
    for _ in range(repeats):
        for model, batch, accumulate in setups:
            entry = samples.setdefault(f"{model}@{batch}x{accumulate}", {"one": [], "two": [], "timelines": []})
            for workers, key in (("1", "one"), ("2", "two")):
                run, _, _ = trainer.train(
                    "--model",
                    model,
                    "--workers",
                    workers,
                    *ONE_CPU,
                    "--batch-size",
                    str(batch),
                    "--accumulate",
                    str(accumulate),
                    *fixed,
                )
                entry[key] += [e["images_per_s"] for e in run["history"][1:]]
                entry["timelines"].append({"workers": int(workers), **run["timeline"]})
    return {
        key: {
            "one_worker": statistics.median(entry["one"]),
            "two_workers": statistics.median(entry["two"]),
            "efficiency": statistics.median(entry["two"]) / (2 * statistics.median(entry["one"])),
            "samples": entry,
        }
        for key, entry in samples.items()
    }


def overhead(trainer: Trainer, models: list[str], epochs: int, repeats: int) -> dict:
    """a: the seed's plain Keras script; b: `digits train`, 1 worker with every CPU, computing in
    float32 as the script does (what our machinery costs, not what bfloat16 gains)."""
    fixed = ["--epochs", str(epochs), "--val-fraction", "0", "--target", "1.0", "--batch-size", "32"]
    fixed += ["--precision", "float32"]
    limit = ["--limit", str(trainer.limit)] if trainer.limit else []
    samples: dict = {model: {"a": [], "b": [], "a_wall": [], "b_wall": []} for model in models}
    for _ in range(repeats):
        for model in models:
            seed = trainer.run.baseline(
                "train",
                "--model",
                model,
                "--train-csv",
                str(trainer.data / "train.csv"),
                "--epochs",
                str(epochs),
                *limit,
            )
            samples[model]["a"] += seed["images_per_s"][1:]
            samples[model]["a_wall"].append(seed["process_s"])
            run, wall, _ = trainer.train("--model", model, "--workers", "1", *fixed)
            samples[model]["b"] += [e["images_per_s"] for e in run["history"][1:]]
            samples[model]["b_wall"].append(wall)
    return {
        model: {name: statistics.median(values) for name, values in entry.items()} for model, entry in samples.items()
    }


def time_to_accuracy(trainer: Trainer, quick: bool, repeats: int) -> dict:
    """`--preset fast` (stops at 99% validation accuracy) with 1 worker x 1 CPU and 2 workers
    x 1 CPU: the whole command, the training clock until the epoch that reached 99%, and the
    start-up before the first step. A quick run trains one epoch of the dense net instead,
    to a target it reaches (5%), so that the ratios of the two come out too."""
    settings = [("1 worker", ["--workers", "1"]), ("2 workers", ["--workers", "2"])]
    samples: dict = {name: [] for name, _ in settings}
    for _ in range(repeats):
        for name, args in settings:
            run, wall, _ = trainer.train("--preset", "fast", *args, *ONE_CPU, *(QUICK_TO_TARGET if quick else []))
            samples[name].append(
                {
                    "wall_s": wall,
                    "epochs": run["epochs_run"],
                    "reached": run["stop_reason"].startswith("target reached"),
                    "val_accuracy": run["history"][-1]["val_accuracy"],
                    "training_s": run["history"][-1]["elapsed_s"],
                    "first_step_s": run["first_step_after_launch_s"],
                    "timeline": run["timeline"],
                }
            )
    return {
        name: {
            **{
                key: statistics.median(run[key] for run in runs)
                for key in ("wall_s", "training_s", "first_step_s", "epochs", "val_accuracy")
            },
            "reached": sum(run["reached"] for run in runs),
            "repeats": len(runs),
            "runs": runs,
        }
        for name, runs in samples.items()
    }


def step_parts(run: Processes, quick: bool) -> dict:
    """bench/probes.py `steps`: the parts of a step (seed CNN, batch 32) for 1 and 2 workers of
    one CPU, and whole steps as Keras runs them and with digits' data-parallel step. A quick
    run times the dense net's steps: every part and variant, at a fraction of the CNN's time."""
    variants = ["keras", "bfloat16", "bfloat16x2"]
    quick_settings = ["--model", "dense", "--calls", "1", "--rounds", "1", "--timings", "1"] if quick else []
    shapes = [(2, 32)] if quick else [(1, 32), (2, 32), (1, 128), (2, 128)]
    return {
        f"{workers}x1@{batch}": run.probe(
            "steps",
            "--workers",
            str(workers),
            "--cpus",
            "1",
            "--batch",
            str(batch),
            "--variants",
            *variants,
            *quick_settings,
        )
        for workers, batch in shapes
    }


def two_node_cluster(trainer: Trainer) -> dict:
    """`cluster/local_cluster.sh start 2` (a head without CPUs, two worker nodes of one CPU
    each): `--preset fast --workers 2`, one worker per node."""
    with local_cluster(6392) as cluster:
        run, wall, _ = trainer.train("--preset", "fast", "--workers", "2", env=cluster)
    return {
        "wall_s": wall,
        "epochs": run["epochs_run"],
        "stop_reason": run["stop_reason"],
        "val_accuracy": run["history"][-1]["val_accuracy"],
        "shards": run["shards"],
        "images_per_s": [e["images_per_s"] for e in run["history"]],
    }

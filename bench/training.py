"""Training benchmarks: the seed's plain Keras script (a) against `digits train` with one
worker (b) and two workers of one CPU each (c); and the time to 99% validation accuracy of the
seed's settings against `--preset fast`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.processes import Processes


class Trainer:
    """`digits train` runs into fresh run directories of the scratch folder."""

    def __init__(self, run: Processes, data: Path, limit: int | None):
        self.run, self.data, self.limit, self.count = run, data, limit, 0

    def train(self, *args: str) -> tuple[dict, float, Path]:
        """Returns run.json, the wall time and the run directory."""
        self.count += 1
        run_dir = self.run.scratch / f"run-{self.count}"
        limit = ["--limit", str(self.limit)] if self.limit else []
        wall = self.run.digits("train", "--data", str(self.data), "--out", str(run_dir), *limit, *args)
        return json.loads((run_dir / "run.json").read_text()), wall, run_dir


def throughput(trainer: Trainer, setups: list[tuple[str, int]], epochs: int, repeats: int) -> dict:
    """Images/s of the epochs after the first, same per-worker batch, no validation split
    (the seed has none): a, the seed's script; b, 1 worker with every CPU; c, 2 workers x 1
    CPU. Also returns, per model, the run directory of a batch-32 model for scoring."""
    fixed = ["--epochs", str(epochs), "--val-fraction", "0", "--target", "1.0"]
    limit = ["--limit", str(trainer.limit)] if trainer.limit else []
    samples: dict = {}
    for _ in range(repeats):
        for model, batch in setups:
            entry = samples.setdefault(f"{model}@{batch}", {"a": [], "b": [], "c": [], "a_wall": [], "b_wall": []})
            if batch == 32:
                seed = trainer.run.baseline("train", "--model", model, "--train-csv",
                                            str(trainer.data / "train.csv"), "--epochs", str(epochs), *limit)
                entry["a"] += seed["images_per_s"][1:]
                entry["a_wall"].append(seed["process_s"])
            one, wall, run_dir = trainer.train("--model", model, "--workers", "1",
                                               "--batch-size", str(batch), *fixed)
            entry["b"] += [e["images_per_s"] for e in one["history"][1:]]
            entry["b_wall"].append(wall)
            if batch == 32:
                entry["run_dir"] = str(run_dir)
            two, _, _ = trainer.train("--model", model, "--workers", "2", "--cpus-per-worker", "1",
                                      "--batch-size", str(batch), *fixed)
            entry["c"] += [e["images_per_s"] for e in two["history"][1:]]
    return {key: {**{name: statistics.median(values) for name, values in entry.items()
                     if isinstance(values, list) and values},
                  "run_dir": entry.get("run_dir"), "samples": entry}
            for key, entry in samples.items()}


def time_to_accuracy(trainer: Trainer, quick: bool, repeats: int) -> dict:
    """Wall time of `digits train` (start-up included) until validation accuracy >= 99%: the
    seed's settings (batch 32, Adam 1e-3, at most 10 epochs) against --preset fast, repeats
    interleaved, medians reported: whether a run gets there at all varies from run to run, as
    99% is near where the seed's CNN ends. A quick run trains the preset alone, for one epoch."""
    target = ["--target-metric", "val_accuracy", "--target", "0.99"]
    seed = ["--model", "cnn", "--batch-size", "32", "--learning-rate", "0.001", "--epochs", "10", *target]
    fast = ["--preset", "fast", *(["--epochs", "1"] if quick else [])]
    settings = [("fast", fast)] if quick else [("seed", seed), ("fast", fast)]
    samples: dict = {name: [] for name, _ in settings}
    for _ in range(repeats):
        for name, args in settings:
            run, wall, _ = trainer.train(*args)
            samples[name].append({"wall_s": wall, "epochs": run["epochs_run"],
                                  "reached": run["stop_reason"].startswith("target reached"),
                                  "val_accuracy": run["history"][-1]["val_accuracy"],
                                  "training_s": run["history"][-1]["elapsed_s"]})
    return {name: {**{key: statistics.median(run[key] for run in runs)
                      for key in ("wall_s", "training_s", "epochs", "val_accuracy")},
                   "reached": sum(run["reached"] for run in runs), "repeats": len(runs), "runs": runs}
            for name, runs in samples.items()}

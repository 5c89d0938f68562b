"""What a second worker could add at best: the 2-worker run against two 1-worker runs that share
nothing but the machine, with Ray and without it.

For each per-worker batch, in interleaved repeats, images/s of the epochs after the first:
- without Ray: bench/probes.py `uncoupled` (one worker's training in a plain process, one CPU's
  threads, the dtype policy `digits train` picks here) alone, then two at once;
- on one shared Ray (`cluster/local_cluster.sh start 0` with every CPU on its head, or the Ray
  the harness was pointed at): `digits train --workers 1 --cpus-per-worker 1` alone, two such
  runs at once, and one `--workers 2 --cpus-per-worker 1` run, then again with `--sync-every 4`
  (each worker's own updates, the weights averaged every 4 batches).
A pair's ceiling is the sum of its two runs over twice the one alone (1.0: the machine gives two
workers all it gives one). The 2-worker run is then given as a fraction of each pair's sum: what
the coupling (the all-reduce every step, waiting for the slower worker) costs beyond what the
machine and Ray's own processes take anyway.

Then, per batch, where the time of a step goes: one more `--workers 1` and `--workers 2` run,
each with `--profile-steps` over the second epoch's first PROFILED_STEPS steps, read by
bench/step_profile.py.
"""

from __future__ import annotations

import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from bench.processes import Processes, local_cluster
from bench.step_profile import breakdown
from bench.training import ONE_CPU, Trainer

PORT = 6394
SYNC_EVERY = 4  # the 2-worker run again with --sync-every: the all-reduce once per this many batches
PROFILED_STEPS = 64


def measure(run: Processes, data: Path, model: str, batches: list[int], rows: int, epochs: int, repeats: int) -> dict:
    trainer = Trainer(run, data, limit=rows, name="ceilings-run")
    fixed = ["--model", model, *ONE_CPU, "--epochs", str(epochs), "--val-fraction", "0", "--target", "1.0"]
    names = ("plain", "plain_pair", "ray", "ray_pair", "two_workers", "two_workers_synced_less")
    samples = {batch: {name: [] for name in names} for batch in batches}
    # The harness's Ray when it was given one (the test suite's), else a head of its own.
    shared = nullcontext({}) if os.environ.get("RAY_ADDRESS") else local_cluster(PORT, 0, os.cpu_count() or 1)
    with shared as env:

        def digits(workers: int, batch: int, *more: str) -> list[float]:
            found, _, _ = trainer.train("--workers", str(workers), "--batch-size", str(batch), *fixed, *more, env=env)
            return [epoch["images_per_s"] for epoch in found["history"][1:]]

        def plain(batch: int) -> list[float]:
            found = run.probe(
                "uncoupled",
                *("--train-csv", str(data / "train.csv"), "--model", model, "--batch", str(batch)),
                *("--rows", str(rows), "--epochs", str(epochs)),
            )
            return found["images_per_s"][1:]

        for _ in range(repeats):
            for batch in batches:
                entry = samples[batch]
                entry["plain"].append(statistics.median(plain(batch)))
                entry["plain_pair"].append([statistics.median(rates) for rates in _at_once(plain, batch)])
                entry["ray"].append(statistics.median(digits(1, batch)))
                entry["ray_pair"].append(
                    [statistics.median(rates) for rates in _at_once(lambda batch: digits(1, batch), batch)]
                )
                entry["two_workers"].append(statistics.median(digits(2, batch)))
                entry["two_workers_synced_less"].append(
                    statistics.median(digits(2, batch, "--sync-every", str(SYNC_EVERY)))
                )
        profiles = {batch: {} for batch in batches}
        for batch in batches:
            for workers, key in ((1, "one_worker"), (2, "two_workers")):
                steps = rows // (batch * workers)  # an epoch's
                # Within the second epoch: the trace ends before the run does
                window = f"{steps + 1}:{steps + min(PROFILED_STEPS, steps)}"
                _, _, run_dir = trainer.train(
                    "--workers", str(workers), "--batch-size", str(batch), *fixed, "--profile-steps", window, env=env
                )
                profiles[batch][key] = breakdown(run_dir)
    return {f"{model}@{batch}": {**_summary(entry), "profile": profiles[batch]} for batch, entry in samples.items()}


def _at_once(work, batch: int) -> list:
    """Two runs of `work(batch)` started together; both results."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(work, [batch, batch]))


def _summary(entry: dict) -> dict:
    plain, ray, two, synced_less = (
        statistics.median(entry[name]) for name in ("plain", "ray", "two_workers", "two_workers_synced_less")
    )
    plain_pair, ray_pair = (statistics.median(sum(pair) for pair in entry[name]) for name in ("plain_pair", "ray_pair"))
    return {
        "plain": plain,
        "plain_pair": plain_pair,
        "ray": ray,
        "ray_pair": ray_pair,
        "two_workers": two,
        "plain_ceiling": plain_pair / (2 * plain),
        "ray_ceiling": ray_pair / (2 * ray),
        "two_workers_of_ray_pair": two / ray_pair,
        "two_workers_of_plain_pair": two / plain_pair,
        "efficiency": two / (2 * ray),
        "sync_every": SYNC_EVERY,
        "two_workers_synced_less": synced_less,
        "synced_less_of_ray_pair": synced_less / ray_pair,
        "samples": entry,
    }

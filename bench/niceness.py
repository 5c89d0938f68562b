"""`python -m bench.niceness`: what Ray's default worker niceness (15) costs training, against
the niceness 0 that our processes ask for (RAY_worker_niceness, digit_models/__init__.py).

`digits train` runs side by side in one invocation, interleaved (15, 0, 15, 0, ...) so that a
drift in the machine's speed reaches both alike: the `best` preset's CNN with 1 worker and every
CPU, and the seed's CNN with 2 workers x 1 CPU. Per setup: images/s of the epochs after the
first (median), the whole command's wall time (median), and the ratios. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.processes import REPO, Processes
from bench.training import Trainer

SETUPS = {
    "deep_cnn@64, 1 worker x 2 CPUs (`--preset best`)": [
        "--preset", "best", "--workers", "1", "--val-fraction", "0", "--target-metric", "accuracy"],
    "cnn@32, 2 workers x 1 CPU": [
        "--model", "cnn", "--workers", "2", "--cpus-per-worker", "1", "--batch-size", "32",
        "--val-fraction", "0", "--target", "1.0"],
}
NICENESS = ("15", "0")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.niceness", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--limit", type=int, default=12_000, help="training rows (default 12,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = {(setup, nice): {"images_per_s": [], "wall_s": []} for setup in SETUPS for nice in NICENESS}
    with tempfile.TemporaryDirectory(prefix="digits-bench-niceness-") as scratch:
        run = Processes(Path(scratch))
        trainer = Trainer(run, Path(args.data), args.limit)
        for _ in range(args.repeats):
            for setup, options in SETUPS.items():
                for nice in NICENESS:
                    summary, wall, _ = trainer.train(*options, "--epochs", str(args.epochs),
                                                     env={"RAY_worker_niceness": nice})
                    if summary["worker_process"]["niceness"] != int(nice):
                        raise SystemExit(f"bench: asked for niceness {nice}, the worker ran at "
                                         f"{summary['worker_process']['niceness']}")
                    samples[setup, nice]["images_per_s"] += [e["images_per_s"] for e in summary["history"][1:]]
                    samples[setup, nice]["wall_s"].append(wall)
        peak = run.arithmetic("cnn")["peak_gflops"]
    print(f"Machine: float32 matmul peak {peak:.0f} GFLOP/s; {args.repeats} repeats, {args.epochs} epochs "
          f"of {args.limit:,} rows each.\n")
    print("| setup | images/s at 15 | images/s at 0 | 0 / 15 | wall at 15 | wall at 0 |")
    print("|---|---|---|---|---|---|")
    for setup in SETUPS:
        low, normal = ({k: statistics.median(v) for k, v in samples[setup, nice].items()} for nice in NICENESS)
        print(f"| {setup} | {low['images_per_s']:,.0f} | {normal['images_per_s']:,.0f} | "
              f"{normal['images_per_s'] / low['images_per_s']:.2f} | {low['wall_s']:.1f} s | {normal['wall_s']:.1f} s |")


if __name__ == "__main__":
    main()

"""Two variants of `digits train` side by side in one invocation: each setup runs under both,
interleaved (a, b, a, b, ...) so that a drift in the machine's speed reaches both alike. Per
setup: images/s of the epochs after the first (median), the whole command's wall time
(median), and the ratios. Prints a Markdown table. bench/niceness.py and bench/precision.py
are its two uses."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.processes import REPO, Processes
from bench.training import Trainer


# The `best` preset's CNN on 1 worker with every CPU, as scripts/best.sh trains it.
BEST_ONE_WORKER = (
    "deep_cnn@64, 1 worker x 2 CPUs (`--preset best`)",
    ["--preset", "best", "--workers", "1", "--val-fraction", "0", "--target-metric", "accuracy"],
)


@dataclass
class Variant:
    name: str
    options: list[str] = field(default_factory=list)  # added to each setup's `digits train` options
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict], str | None] = lambda run: None  # run.json -> what went wrong, if anything


def main(prog: str, description: str, setups: dict[str, list[str]], variants: tuple[Variant, Variant]) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--limit", type=int, default=12_000, help="training rows (default 12,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = {(setup, v.name): {"images_per_s": [], "wall_s": []} for setup in setups for v in variants}
    with tempfile.TemporaryDirectory(prefix="digits-bench-paired-") as scratch:
        run = Processes(Path(scratch))
        trainer = Trainer(run, Path(args.data), args.limit)
        for _ in range(args.repeats):
            for setup, options in setups.items():
                for variant in variants:
                    summary, wall, _ = trainer.train(
                        *options, *variant.options, "--epochs", str(args.epochs), env=variant.env
                    )
                    if problem := variant.check(summary):
                        raise SystemExit(f"bench: {variant.name}: {problem}")
                    samples[setup, variant.name]["images_per_s"] += [
                        epoch["images_per_s"] for epoch in summary["history"][1:]
                    ]
                    samples[setup, variant.name]["wall_s"].append(wall)
        peak = run.arithmetic("cnn")["peak_gflops"]
    a, b = (v.name for v in variants)
    print(
        f"Machine: float32 matmul peak {peak:.0f} GFLOP/s; {args.repeats} repeats, {args.epochs} epochs "
        f"of {args.limit:,} rows each.\n"
    )
    print(f"| setup | images/s, {a} | images/s, {b} | {b} / {a} | wall, {a} | wall, {b} |")
    print("|---|---|---|---|---|---|")
    for setup in setups:
        first, second = ({k: statistics.median(v) for k, v in samples[setup, name].items()} for name in (a, b))
        print(
            f"| {setup} | {first['images_per_s']:,.0f} | {second['images_per_s']:,.0f} | "
            f"{second['images_per_s'] / first['images_per_s']:.2f} | {first['wall_s']:.1f} s | "
            f"{second['wall_s']:.1f} s |"
        )

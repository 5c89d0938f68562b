"""`python -m bench.precision_accuracy`: whether bfloat16 compute (`--precision bfloat16`, what
`auto` picks on CPUs with bfloat16 instructions) costs accuracy: the `fast` preset trained for all
its epochs (`--target 1.0`, the same budget in epochs) under float32 and bfloat16, seed by seed,
interleaved, each model scored on the official MNIST test images and on test.csv's other
labelled rows (bench/heldout.py). Prints a Markdown table: per seed, images/s of the epochs after
the first and the two accuracies, float32 against bfloat16."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.heldout import labelled_sets, probabilities
from bench.processes import REPO, Processes
from bench.training import Trainer

PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, help="training rows (default: all)")
    args = parser.parse_args()

    from digit_models.nets.models import load_model_file

    sets = labelled_sets(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="digits-bench-precision-") as scratch:
        run = Processes(Path(scratch))
        trainer = Trainer(run, Path(args.data), args.limit)
        for seed in args.seeds:
            row = {"seed": seed}
            for precision in PRECISIONS:
                summary, _, run_dir = trainer.train(
                    "--preset", "fast", "--target", "1.0", "--seed", str(seed), "--precision", precision
                )
                model = load_model_file(str(run_dir / "model.keras"))
                row[precision] = {
                    "computed_in": summary["worker_process"]["precision"],
                    "epochs": summary["epochs_run"],
                    "images_per_s": statistics.median(epoch["images_per_s"] for epoch in summary["history"][1:]),
                    **{
                        name: float((probabilities(model, images, 0).argmax(axis=1) == labels).mean())
                        for name, (images, labels) in sets.items()
                    },
                }
            rows.append(row)
        peak = run.arithmetic("cnn")["peak_gflops"]
    print(f"Machine: float32 matmul peak {peak:.0f} GFLOP/s; `--preset fast --target 1.0`, every epoch run.\n")
    print(
        "| seed | images/s, float32 | images/s, bfloat16 | ratio | official test, float32 | official test, "
        "bfloat16 | held-out rows, float32 | held-out rows, bfloat16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        f32, bf16 = row["float32"], row["bfloat16"]
        assert (f32["computed_in"], bf16["computed_in"]) == ("float32", "mixed_bfloat16"), row
        print(
            f"| {row['seed']} | {f32['images_per_s']:,.0f} | {bf16['images_per_s']:,.0f} | "
            f"{bf16['images_per_s'] / f32['images_per_s']:.2f} | {f32['official_test']:.2%} | "
            f"{bf16['official_test']:.2%} | {f32['heldout_train']:.2%} | {bf16['heldout_train']:.2%} |"
        )


if __name__ == "__main__":
    main()

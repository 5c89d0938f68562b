"""Whether bfloat16 compute (`--precision bfloat16`, what `auto` picks on CPUs with bfloat16
instructions) costs accuracy, and what it gains in speed: the `fast` preset trained for all its
epochs (`--target 1.0`, the same budget in epochs) under float32 and bfloat16, seed by seed,
interleaved, each model scored on the official MNIST test images and on test.csv's other
labelled rows (bench/heldout.py). The `precision` section of `python -m bench`; alone, `python -m
bench.precision_accuracy` prints its table."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.precision import VARIANTS
from bench.processes import REPO, Processes
from bench.training import Trainer
from digit_models.runtime.cpu_features import this_cpu_has_bfloat16

PRECISIONS = ("float32", "bfloat16")  # the names the results use for VARIANTS' two


def compare(trainer: Trainer, data: Path, seeds: list[int]) -> dict:
    """Per seed and precision: the epochs' images/s (after the first, median) and the two
    accuracies. A CPU without bfloat16 instructions, which `digits train` refuses it on, is
    recorded as not run."""
    if this_cpu_has_bfloat16() is False:
        return {"not_run": "this CPU has no bfloat16 instructions"}
    from bench.heldout import labelled_sets, probabilities  # TensorFlow: not in the bench's own process before
    from digit_models.nets.models import load_model_file

    sets = labelled_sets(str(data))
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for precision, variant in zip(PRECISIONS, VARIANTS):
            summary, _, run_dir = trainer.train(
                "--preset", "fast", "--target", "1.0", "--seed", str(seed), *variant.options
            )
            if problem := variant.check(summary):
                raise SystemExit(f"bench: {variant.name}: {problem}")
            model = load_model_file(str(run_dir / "model.keras"))
            row[precision] = {
                "epochs": summary["epochs_run"],
                "images_per_s": statistics.median(epoch["images_per_s"] for epoch in summary["history"][1:]),
                **{
                    name: float((probabilities(model, images, 0).argmax(axis=1) == labels).mean())
                    for name, (images, labels) in sets.items()
                },
            }
        rows.append(row)
    return {"rows": rows}


def ratios(result: dict) -> dict:
    if "rows" not in result:
        return {}
    rows = result["rows"]

    def mean_gain(name: str) -> float:
        return 100 * statistics.mean(row["bfloat16"][name] - row["float32"][name] for row in rows)

    return {
        "`--preset fast` images/s, bfloat16 / float32 (median of seeds)": statistics.median(
            row["bfloat16"]["images_per_s"] / row["float32"]["images_per_s"] for row in rows
        ),
        "`--preset fast` official-test accuracy, bfloat16 - float32 (mean of seeds, points)": mean_gain(
            "official_test"
        ),
        "`--preset fast` held-out rows' accuracy, bfloat16 - float32 (mean of seeds, points)": mean_gain(
            "heldout_train"
        ),
    }


def table(result: dict) -> list[str]:
    lines = [
        "",
        "## bfloat16 against float32 (bench/precision_accuracy.py)",
        "",
    ]
    if "rows" not in result:
        return lines + [f"Not run: {result['not_run']}."]
    lines += [
        "`--preset fast --target 1.0` (all 3 epochs, 1 worker with every CPU), seeds interleaved, under "
        "`--precision float32` and `--precision bfloat16` (what `auto` picks on this CPU); each model "
        "scored on the official MNIST test images and on test.csv's other labelled rows.",
        "",
        "| seed | images/s, float32 | images/s, bfloat16 | ratio | official test, float32 | official test, "
        "bfloat16 | held-out rows, float32 | held-out rows, bfloat16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        f32, bf16 = row["float32"], row["bfloat16"]
        lines.append(
            f"| {row['seed']} | {f32['images_per_s']:,.0f} | {bf16['images_per_s']:,.0f} | "
            f"{bf16['images_per_s'] / f32['images_per_s']:.2f} | {f32['official_test']:.2%} | "
            f"{bf16['official_test']:.2%} | {f32['heldout_train']:.2%} | {bf16['heldout_train']:.2%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, help="training rows (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="digits-bench-precision-") as scratch:
        result = compare(Trainer(Processes(Path(scratch)), Path(args.data), args.limit), Path(args.data), args.seeds)
    print("\n".join(table(result)))


if __name__ == "__main__":
    main()

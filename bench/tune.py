"""`python -m bench.tune`: what early stopping saves a search. `digits tune` with 8 trials of the
seed's CNN on 6,000 rows, 4 epochs at most (its default space: learning rate, batch size, label
smoothing; ASHA; trials sharing the machine's CPUs), against the same 8 trials' settings trained
to their end one after another by `digits train` (every CPU each, as a user would run them):
the wall time of each way and their ratio, the trials the scheduler stopped, the best
val_accuracy of each way, and the search's best model scored on the official MNIST test images
(`digits predict`, `digits evaluate`). Prints a Markdown table."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import tempfile
from pathlib import Path

from bench import machine
from bench.processes import REPO, Processes
from digit_models.tuning.results import train_command


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--rows", type=int, default=6_000, help="training rows (default 6,000)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4, help="epochs at most (default 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="digits-bench-tune-") as scratch:
        run = Processes(Path(scratch))
        search = Path(scratch, "search")
        search_s = run.digits(
            "tune",
            "--data",
            args.data,
            "--out",
            str(search),
            "--trials",
            str(args.trials),
            "--model",
            "cnn",
            "--limit",
            str(args.rows),
            "--epochs",
            str(args.epochs),
        )
        rows = json.loads((search / "results.json").read_text())
        best = json.loads((search / "best.json").read_text())
        one_by_one_s, full_best, full_epochs = 0.0, 0.0, 0
        for row in rows:  # each trial's own settings (started.json's), to its end, alone
            started = json.loads((search / row["run_dir"] / "started.json").read_text())["config"]
            words = shlex.split(train_command(started, fixed={}))
            out = str(Path(scratch, "one-by-one", row["trial"]))
            words[words.index("--out") + 1] = out
            one_by_one_s += run.digits(*words[1:])
            trained = json.loads(Path(out, "run.json").read_text())
            full_best = max(full_best, trained["history"][-1]["val_accuracy"])
            full_epochs += trained["epochs_run"]
        scored = Path(scratch, "scored")
        run.digits(
            "predict", "--run", str(search / best["run_dir"]), "--input", f"{args.data}/test.csv", "--out", str(scored)
        )
        run.digits("evaluate", "--predictions", str(scored), "--labels", f"{args.data}/test_labels.csv")
        official = json.loads((scored / "evaluation.json").read_text())["official_mnist_test"]["accuracy"]
        peak = run.arithmetic("cnn")["peak_gflops"]
    stopped = sum(row["state"] == "stopped early" for row in rows)
    print(f"Machine: {platform.platform()}, {machine.cpu_description()}; float32 matmul peak {peak:.0f} GFLOP/s.")
    print()
    print("| way | wall | trials stopped early | epochs trained | best val_accuracy |")
    print("|---|---|---|---|---|")
    print(
        f"| `digits tune`, {len(rows)} trials | {search_s:.0f} s | {stopped} of {len(rows)} | "
        f"{sum(row['epochs'] or 0 for row in rows)} | {best['val_accuracy']:.4f} (trial {best['trial']}) |"
    )
    print(
        f"| the same {len(rows)} trials to their end, one after another | {one_by_one_s:.0f} s | - | "
        f"{full_epochs} | {full_best:.4f} |"
    )
    print()
    print(
        f"Search / one after another: {search_s / one_by_one_s:.2f}. The search's best model "
        f"(trial {best['trial']}: `{best['command']}`) on the official MNIST test images: {official:.4f}."
    )


if __name__ == "__main__":
    main()

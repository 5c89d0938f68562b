"""Whether `--sync-every K` (each worker's own updates, the weights averaged every K batches)
reaches the accuracy of the data-parallel step, and how much sooner: `--preset fast` (stops at
99% validation accuracy) with 1 worker x 1 CPU, 2 workers x 1 CPU, and 2 workers x 1 CPU with
`--sync-every K`, seeds interleaved; per run the epochs, the images/s of the epochs after the
first, the training clock until the stop, the whole command, and the accuracy of the model on
the official MNIST test images of test.csv. Prints one JSON line.

    python -m bench.sync_every [--data data] [--sync-every 4] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.processes import Processes
from bench.training import ONE_CPU, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data")
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    from bench.heldout import labelled_sets, probabilities
    from digit_models.nets.models import load_model_file
    from digit_models.runtime.tf_setup import configure_tensorflow

    configure_tensorflow(cpus=2)
    images, labels = labelled_sets(args.data)["official_test"]
    variants = {
        "1 worker": ["--workers", "1"],
        "2 workers": ["--workers", "2"],
        f"2 workers, --sync-every {args.sync_every}": ["--workers", "2", "--sync-every", str(args.sync_every)],
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="digits-sync-every-") as scratch:
        trainer = Trainer(Processes(Path(scratch)), Path(args.data), limit=None)
        for seed in args.seeds:
            for name, options in variants.items():
                summary, wall, run_dir = trainer.train("--preset", "fast", *ONE_CPU, "--seed", str(seed), *options)
                model = load_model_file(str(run_dir / "model.keras"))
                runs[name].append(
                    {
                        "seed": seed,
                        "epochs": summary["epochs_run"],
                        "stop_reason": summary["stop_reason"],
                        "val_accuracy": summary["history"][-1]["val_accuracy"],
                        "images_per_s": statistics.median(epoch["images_per_s"] for epoch in summary["history"][1:]),
                        "training_s": summary["history"][-1]["elapsed_s"],
                        "wall_s": wall,
                        "official_test": float((probabilities(model, images, 0).argmax(axis=1) == labels).mean()),
                    }
                )
    medians = {
        name: {key: statistics.median(run[key] for run in found) for key in found[0] if key not in ("stop_reason",)}
        for name, found in runs.items()
    }
    print(json.dumps({"runs": runs, "medians": medians}))


if __name__ == "__main__":
    main()

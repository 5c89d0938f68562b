"""Whether `--recompute-batchnorm` helps: finished runs' models scored with the BatchNorm
statistics they were saved with and with the statistics recomputed from their own plain
training rows (digit_models/training/batchnorm.py, as a run with the option ends: the trained weights
are the same either way). Held out: test.csv's rows that are MNIST training images train.csv
left out (where to choose), the run's validation rows if any, and the official MNIST test
images (where to report); plain and with test-time augmentation. Prints one JSON line per run.

    python -m bench.batchnorm RUN_DIR ... [--data data] [--tta 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batchnorm", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data", default="data")
    parser.add_argument("--tta", type=int, default=8)
    args = parser.parse_args()

    from bench.heldout import labelled_sets, probabilities
    from digit_models.training.batchnorm import batchnorm_rows, recompute_batchnorm
    from digit_models.storage.kaggle_csv import read_train_csv
    from digit_models.nets.models import load_model_file
    from digit_models.storage.run_dir import RunDir
    from digit_models.runtime.tf_setup import configure_tensorflow
    from digit_models.storage.row_spool import validation_split

    configure_tensorflow(cpus=2)
    for run in args.runs:
        config = json.loads(Path(run, RunDir.RUN).read_text())["config"]
        sets = labelled_sets(args.data, config)
        train = read_train_csv(str(Path(args.data, "train.csv")), limit=config["limit"])
        train_rows, _ = validation_split(len(train), config["val_fraction"], config["seed"])
        plain = train.images[train_rows[batchnorm_rows(len(train_rows), 0, 1, config["seed"])]]
        result = {"run": run, "trained_with_recompute": config.get("recompute_batchnorm", False)}
        for statistics in ("saved", "recomputed"):
            model = load_model_file(str(Path(run, RunDir.MODEL)))
            if statistics == "recomputed":
                recompute_batchnorm(model, plain)
            for set_name, (images, truth) in sets.items():
                for views in (0, args.tta):
                    wrong = int((probabilities(model, images, views).argmax(axis=1) != truth).sum())
                    result[f"{set_name}/{statistics}/tta{views}"] = {"errors": wrong, "images": len(truth)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

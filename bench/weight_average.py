"""Whether a finished run's weight average (`--weight-average`) beat the weights it averaged,
on the same training trajectory: the run's model (the average) and the trained weights (kept
in its last checkpoint's optimizer, see digit_models/training/weight_average.py), each scored on the
run's own validation rows and on the official MNIST test images of test.csv, plain and with
test-time augmentation: right answers and log loss. Prints one JSON line.

    python -m bench.weight_average RUN_DIR [--data data] [--tta 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", default="data")
    parser.add_argument("--tta", type=int, default=8)
    args = parser.parse_args()

    from bench.heldout import labelled_sets, probabilities
    from digit_models.training.checkpoints import load_with_optimizer, newest_complete
    from digit_models.nets.model_file import load_model_bytes
    from digit_models.storage.run_dir import RunDir
    from digit_models.runtime.tf_setup import configure_tensorflow

    configure_tensorflow(cpus=2)
    config = json.loads(Path(args.run, RunDir.RUN).read_text())["config"]
    sets = labelled_sets(args.data, config)

    model_file = newest_complete(args.run).model_file
    checkpoint = f"{args.run}'s newest checkpoint"
    average = load_with_optimizer(model_file, checkpoint)
    trained = load_model_bytes(model_file, checkpoint)
    for mine, theirs in zip(trained.trainable_variables, average.trainable_variables):
        mine.assign(average.optimizer._average_of(theirs))

    def scored(model, images, truth, views: int) -> dict:
        predicted = probabilities(model, images, views)
        return {
            "correct": int((predicted.argmax(axis=1) == truth).sum()),
            "images": len(truth),
            "log_loss": float(-np.log(predicted[np.arange(len(truth)), truth]).mean()),
        }

    result = {"run": args.run, "momentum": config["weight_average"]}
    for set_name, (images, truth) in sets.items():
        for weights, model in (("average", average), ("trained", trained)):
            for views in (0, args.tta):
                result[f"{set_name}/{weights}/tta{views}"] = scored(model, images, truth, views)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

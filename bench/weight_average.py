"""Whether a finished run's weight average (`--weight-average`) beat the weights it averaged,
on the same training trajectory: the run's model (the average) and the trained weights (kept
in its last checkpoint's optimizer, see digit_models/weight_average.py), each scored on the
run's own validation rows and on the official MNIST test images of test.csv, plain and with
test-time augmentation: right answers and log loss. Prints one JSON line.

    python -m bench.weight_average RUN_DIR [--data data] [--tta 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", default="data")
    parser.add_argument("--tta", type=int, default=8)
    args = parser.parse_args()

    from digit_models.augmentation import tta_view
    from digit_models import schedule, weight_average  # noqa: F401  (register what a checkpoint's optimizer names)
    from digit_models.checkpoints import newest_complete
    from digit_models.kaggle_csv import read_test_csv, read_train_csv
    from digit_models.run_dir import RunDir
    from digit_models.evaluation import read_origin
    from digit_models.submission_csv import read_id_label_csv
    from digit_models.tf_setup import configure_tensorflow, keras
    from digit_models.train import validation_split

    configure_tensorflow(cpus=2)
    config = json.loads(Path(args.run, RunDir.RUN).read_text())["config"]
    train = read_train_csv(str(Path(args.data, "train.csv")), limit=config["limit"])
    _, val_rows = validation_split(len(train), config["val_fraction"], config["seed"])
    test = read_test_csv(str(Path(args.data, "test.csv")))
    label_ids, labels = read_id_label_csv(str(Path(args.data, "test_labels.csv")))
    origin_ids, official = read_origin(str(Path(args.data, "test_origin.csv")))
    labels = labels[np.argsort(label_ids)]
    assert np.array_equal(origin_ids, np.arange(1, len(test) + 1))  # test.csv's rows, in order
    assert np.array_equal(np.sort(label_ids), origin_ids)
    sets = {"validation": (train.images[val_rows], train.labels[val_rows]),
            "official_test": (test.images[official], labels[official])}
    if not len(val_rows):  # trained on every row
        del sets["validation"]

    _, model_file = newest_complete(args.run)
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, RunDir.MODEL).write_bytes(model_file)
        average = keras.models.load_model(Path(scratch, RunDir.MODEL))
        trained = keras.models.load_model(Path(scratch, RunDir.MODEL), compile=False)
    for mine, theirs in zip(trained.trainable_variables, average.trainable_variables):
        mine.assign(average.optimizer._average_of(theirs))

    def scored(model, images, truth, views: int) -> dict:
        probabilities = sum(model.predict(tta_view(images.astype("float32"), view), batch_size=1024, verbose=0)
                            for view in range(views + 1)) / (views + 1)
        return {"correct": int((probabilities.argmax(axis=1) == truth).sum()), "images": len(truth),
                "log_loss": float(-np.log(probabilities[np.arange(len(truth)), truth]).mean())}

    result = {"run": args.run, "momentum": config["weight_average"]}
    for set_name, (images, truth) in sets.items():
        for weights, model in (("average", average), ("trained", trained)):
            for views in (0, args.tta):
                result[f"{set_name}/{weights}/tta{views}"] = scored(model, images, truth, views)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The plain single-process baselines the harness compares `digits` against, each run in a
process of its own and printing one JSON line.

`train`: the seed exactly: pandas reads train.csv, pixels / 255, tf.keras (TensorFlow's own
Keras, as the seed imports it), model.fit on in-memory arrays, batch 32, no Ray.
`score`: a trained model's plain in-process model.predict, then pandas.to_parquet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def seed_model(tf, name: str):
    keras = tf.keras
    if name == "dense":
        return keras.models.Sequential([
            keras.layers.Flatten(input_shape=(28, 28)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax")])
    return keras.models.Sequential([
        keras.layers.Conv2D(32, (5, 5), activation="relu", input_shape=(28, 28, 1)),
        keras.layers.MaxPooling2D(2, 2),
        keras.layers.Conv2D(64, (5, 5), activation="relu"),
        keras.layers.MaxPooling2D(2, 2),
        keras.layers.Flatten(),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax")])


def train(args) -> dict:
    started = time.perf_counter()
    import pandas as pd
    import tensorflow as tf

    frame = pd.read_csv(args.train_csv, nrows=args.limit)
    labels = frame.pop("label").to_numpy()
    images = frame.to_numpy().reshape(-1, 28, 28) / 255.0
    if args.model == "cnn":
        images = images.reshape(-1, 28, 28, 1)
    model = seed_model(tf, args.model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    epoch_seconds = []

    class Timing(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.began)

    fit_started = time.perf_counter()
    model.fit(images, labels, epochs=args.epochs, batch_size=32, callbacks=[Timing()], verbose=0)
    return {"images": len(labels), "epoch_s": epoch_seconds,
            "images_per_s": [len(labels) // 32 * 32 / s for s in epoch_seconds],
            "fit_s": time.perf_counter() - fit_started, "wall_s": time.perf_counter() - started,
            "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else "?"}


def score(args) -> dict:
    started = time.perf_counter()
    import digit_models  # noqa: F401  (the model file is tf-keras's; selects it)
    import pandas as pd
    import tf_keras as keras
    from digit_models.data import read_test_csv

    model = keras.models.load_model(args.model_file, compile=False)
    test = read_test_csv(args.test_csv)
    scoring_started = time.perf_counter()
    probabilities = model.predict(test.images, batch_size=1024, verbose=0)
    frame = pd.DataFrame({"ImageId": test.image_ids.astype("int32"),
                          "Label": probabilities.argmax(axis=1).astype("int32"),
                          "Confidence": probabilities.max(axis=1),
                          **{f"prob_{d}": probabilities[:, d] for d in range(10)}})
    frame.to_parquet(args.out, index=False)
    scoring_s = time.perf_counter() - scoring_started
    return {"images": len(frame), "scoring_s": scoring_s, "images_per_s": len(frame) / scoring_s,
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train")
    fit.add_argument("--model", choices=["dense", "cnn"], required=True)
    fit.add_argument("--train-csv", required=True)
    fit.add_argument("--epochs", type=int, default=4)
    fit.add_argument("--limit", type=int, default=None)
    scoring = commands.add_parser("score")
    scoring.add_argument("--model-file", required=True)
    scoring.add_argument("--test-csv", required=True)
    scoring.add_argument("--out", required=True)
    args = parser.parse_args()
    result = train(args) if args.command == "train" else score(args)
    sys.stdout.write("BENCH " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

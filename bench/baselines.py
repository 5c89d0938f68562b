"""The plain single-process baselines the harness compares `digits` against, each run in a
process of its own and printing one JSON line.

`train`: the seed exactly: pandas reads train.csv, pixels / 255, tf.keras (TensorFlow's own
Keras, as the seed imports it), model.fit on in-memory arrays, batch 32, no Ray.
`score`: a trained model's plain in-process model.predict, then pandas.to_parquet and a
submission.csv.
`serve`: the same model behind the standard library's HTTP server (one process, a thread per
connection), answering `digits serve`'s POST /predict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def seed_model(tf, name: str):
    keras = tf.keras
    if name == "dense":
        return keras.models.Sequential(
            [
                keras.layers.Flatten(input_shape=(28, 28)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    return keras.models.Sequential(
        [
            keras.layers.Conv2D(32, (5, 5), activation="relu", input_shape=(28, 28, 1)),
            keras.layers.MaxPooling2D(2, 2),
            keras.layers.Conv2D(64, (5, 5), activation="relu"),
            keras.layers.MaxPooling2D(2, 2),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


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
    return {
        "images": len(labels),
        "epoch_s": epoch_seconds,
        "images_per_s": [len(labels) // 32 * 32 / s for s in epoch_seconds],
        "fit_s": time.perf_counter() - fit_started,
        "wall_s": time.perf_counter() - started,
        "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else "?",
    }


def score(args) -> dict:
    """What a user would write without this project: pandas reads the input whole, Keras
    predicts it whole, pandas writes the Parquet predictions and submission.csv."""
    started = time.perf_counter()
    import pandas as pd

    from digit_models.nets.models import load_model_file  # TensorFlow loads here, timed as the import
    from digit_models.runtime.process_memory import peak_rss_mb

    imported = time.perf_counter()

    # Keras's own loader, behind the check every model file of ours gets (nets/model_file.py), and
    # computing in float32 as our commands do: a model trained in bfloat16 then gives both the same
    # arithmetic, and the same labels on near-ties.
    model = load_model_file(args.model_file)
    loaded = time.perf_counter()
    if args.input.endswith(".csv"):
        frame = pd.read_csv(args.input)
        ids = np.arange(1, len(frame) + 1, dtype=np.int32)
    else:
        frame = pd.read_parquet(args.input)
        ids = (frame.pop("ImageId") if "ImageId" in frame else pd.RangeIndex(1, len(frame) + 1)).to_numpy("int32")
    images = frame.to_numpy(dtype=np.uint8).reshape(-1, 28, 28)
    del frame
    read = time.perf_counter()
    probabilities = model.predict(images, batch_size=1024, verbose=0)
    predicted = time.perf_counter()
    labels = probabilities.argmax(axis=1).astype("int32")
    pd.DataFrame(
        {
            "ImageId": ids,
            "Label": labels,
            "Confidence": probabilities.max(axis=1),
            **{f"prob_{d}": probabilities[:, d] for d in range(10)},
        }
    ).to_parquet(f"{args.out}/predictions.parquet", index=False)
    pd.DataFrame({"ImageId": ids, "Label": labels}).sort_values("ImageId").to_csv(
        f"{args.out}/submission.csv", index=False
    )
    done = time.perf_counter()
    return {
        "images": len(ids),
        "seconds": {
            "import": imported - started,
            "load": loaded - imported,
            "read": read - loaded,
            "predict": predicted - read,
            "write": done - predicted,
        },
        "predict_images_per_s": len(ids) / (predicted - read),
        "wall_s": done - started,
        "peak_rss_mb": peak_rss_mb(),
    }


def serve(args) -> dict:
    """What a user would write to put model.keras online without Ray Serve: http.server's
    ThreadingHTTPServer, each request's images through the model as they come. Prints its
    ready line, then serves until it is stopped."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from digit_models.nets.models import load_model_file

    model = load_model_file(args.model_file)  # in float32, as `digits serve` computes (score, above)

    class Predict(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Serve's proxy does
        # The headers and the body go out in two writes; with Nagle's algorithm the second
        # waits for the client's delayed ACK of the first (about 40 ms on Linux) on every request.
        disable_nagle_algorithm = True

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            images = np.array(json.loads(body)["images"], dtype=np.uint8).reshape(-1, 28, 28)
            probabilities = model(images, training=False).numpy()
            answer = json.dumps(
                {"labels": probabilities.argmax(axis=1).tolist(), "probabilities": probabilities.tolist()}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.request_queue_size = 64  # the default 5 would refuse 32 clients' connections
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Predict)
    sys.stdout.write("BENCH " + json.dumps({"ready": args.port}) + "\n")
    sys.stdout.flush()
    server.serve_forever()
    return {}


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
    scoring.add_argument("--input", required=True, help="test.csv, or a Parquet file")
    scoring.add_argument("--out", required=True, help="folder to write into")
    online = commands.add_parser("serve")
    online.add_argument("--model-file", required=True)
    online.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    result = {"train": train, "score": score, "serve": serve}[args.command](args)
    sys.stdout.write("BENCH " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

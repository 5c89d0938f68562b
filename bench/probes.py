"""Measurements that need to look inside Ray's processes, each run in a fresh process of its
own and printing one JSON line.

`startup`: where a `digits predict`'s fixed seconds go: our imports, starting the embedded Ray
(as `digits` starts it), an actor's process, TensorFlow's import and the model load in it, and
stopping Ray.

`steps`: where a training step's time goes, on Ray Train workers under the same strategy and
communication options as `digits train`: the forward and backward pass alone, the gradients'
all-reduce alone (the same tensors, packed as the optimizer packs them), the input pipeline
alone, and the whole step as Keras runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def startup(args) -> dict:
    began = time.time()
    import ray

    from digit_models.ray_runtime import ray_session

    imported = time.time()
    with ray_session():
        started = time.time()

        @ray.remote(num_cpus=1)
        class Loader:
            def __init__(self):
                self.process_started = time.time()
                from digit_models.models import load_model_file
                from digit_models.tf_setup import configure_tensorflow

                self.tf_imported = time.time()
                configure_tensorflow(1)
                load_model_file(args.model_file)
                self.loaded = time.time()

            def times(self):
                return self.process_started, self.tf_imported, self.loaded

        process_started, tf_imported, loaded = ray.get(Loader.remote().times.remote())
        stopping = time.time()
    stopped = time.time()
    return {"imports": imported - began, "ray_start": started - imported,
            "actor_process_start": process_started - started,
            "actor_tensorflow_import": tf_imported - process_started,
            "actor_model_load": loaded - tf_imported, "ray_stop": stopped - stopping}


def steps(args) -> dict:
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from digit_models.ray_runtime import ray_session

    with ray_session(dashboard=True):
        result = TensorflowTrainer(
            _time_steps, train_loop_config=vars(args),
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers,
                                                   resources_per_worker={"CPU": args.cpus}),
            run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="digits-probe-")),
        ).fit()
    return result.return_value


def _time_steps(settings: dict) -> dict:
    """Milliseconds per step (medians of several timed runs of `calls` x STEPS_PER_EXECUTION
    steps, after a warm-up), as every worker sees them; rank 0's are returned."""
    import numpy as np

    from digit_models.config import TrainConfig
    from digit_models.models import build_model
    from digit_models.tf_setup import configure_tensorflow, keras, tf
    from digit_models.train_worker import STEPS_PER_EXECUTION, communication

    configure_tensorflow(settings["cpus"])
    config = TrainConfig(model=settings["model"], batch_size=settings["batch"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication(config))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4096, 28, 28), dtype=np.uint8)
    labels = tf.one_hot(rng.integers(0, 10, 4096), 10)
    data = strategy.distribute_datasets_from_function(lambda _: tf.data.Dataset.from_tensor_slices(
        (images, labels)).shuffle(4096).batch(config.batch_size, drop_remainder=True).repeat().prefetch(2))
    with strategy.scope():
        model = build_model(config.model)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                      steps_per_execution=STEPS_PER_EXECUTION)
    loss = keras.losses.CategoricalCrossentropy(reduction="sum")
    batches = iter(data)

    def gradients(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    @tf.function
    def compute(iterator):
        total = 0.0
        for _ in tf.range(STEPS_PER_EXECUTION):
            grads = strategy.run(gradients, args=next(iterator))
            total += tf.add_n([tf.reduce_sum(g) for g in strategy.experimental_local_results(grads)[0]])
        return total

    @tf.function
    def all_reduce():
        def reduce():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      [tf.ones_like(v) for v in model.trainable_variables])
        for _ in tf.range(STEPS_PER_EXECUTION):
            strategy.run(reduce)

    @tf.function
    def input_only(iterator):
        for _ in tf.range(STEPS_PER_EXECUTION):
            strategy.run(lambda x, y: tf.reduce_sum(x), args=next(iterator))

    def fit():
        model.fit(data, epochs=1, steps_per_epoch=STEPS_PER_EXECUTION, verbose=0)

    timed = {"compute": lambda: compute(batches).numpy(), "all_reduce": all_reduce,
             "input": lambda: input_only(batches), "whole_step": fit}
    result = {}
    for name, call in timed.items():
        call()  # tracing and warm-up
        runs = []
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(settings["calls"]):
                call()
            runs.append((time.perf_counter() - began) * 1000 / (settings["calls"] * STEPS_PER_EXECUTION))
        result[f"{name}_ms"] = sorted(runs)[len(runs) // 2]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probes")
    probes = parser.add_subparsers(dest="probe", required=True)
    probes.add_parser("startup").add_argument("--model-file", required=True)
    step = probes.add_parser("steps")
    step.add_argument("--model", default="cnn")
    step.add_argument("--batch", type=int, default=32, help="per worker")
    step.add_argument("--workers", type=int, default=1)
    step.add_argument("--cpus", type=int, default=1, help="per worker")
    step.add_argument("--calls", type=int, default=4, help="calls of 16 steps per timed run")
    args = parser.parse_args()
    sys.stdout.write("BENCH " + json.dumps({"startup": startup, "steps": steps}[args.probe](args)) + "\n")


if __name__ == "__main__":
    main()

"""Measurements that need to look inside Ray's processes, each run in a fresh process of its
own and printing one JSON line.

`startup`: where a `digits predict`'s fixed seconds go: our imports, starting the embedded Ray
(as `digits` starts it), an actor's process, TensorFlow's import and the model load in it, and
stopping Ray.

`steps`: where a training step's time goes, on Ray Train workers under the same strategy and
communication options as `digits train`: the forward and backward pass alone, the gradients'
all-reduce alone (the same tensors, packed as the optimizer packs them), the input pipeline
alone, and the whole step as Keras runs it.

`uncoupled`: one training worker without Ray and without peers: tf-keras fits the model on
train.csv's first rows in memory, with the thread count, dtype policy, loss and steps per
execution of a `digits train` worker of one CPU; images/s of each epoch. Two at once show what
the machine gives two workers that share nothing (bench/ceilings.py).

`policies`: a whole training step (Keras's fit, one process, every CPU) of a model built under
each Keras dtype policy, timed in interleaved rounds: what `--precision` would cost or
gain on this machine's CPUs in float16 and in bfloat16.
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

    from digit_models.runtime.ray_runtime import ray_session

    imported = time.time()
    with ray_session():
        started = time.time()

        @ray.remote(num_cpus=1)
        class Loader:
            def __init__(self):
                self.process_started = time.time()
                from digit_models.nets.models import load_model_file
                from digit_models.runtime.tf_setup import configure_tensorflow

                self.tf_imported = time.time()
                configure_tensorflow(1)
                load_model_file(args.model_file)
                self.loaded = time.time()

            def times(self):
                return self.process_started, self.tf_imported, self.loaded

        process_started, tf_imported, loaded = ray.get(Loader.remote().times.remote())
        stopping = time.time()
    stopped = time.time()
    return {
        "imports": imported - began,
        "ray_start": started - imported,
        "actor_process_start": process_started - started,
        "actor_tensorflow_import": tf_imported - process_started,
        "actor_model_load": loaded - tf_imported,
        "ray_stop": stopped - stopping,
    }


def steps(args) -> dict:
    import ray.train

    from digit_models.runtime.ray_runtime import ray_session
    from digit_models.training.backend import tensorflow_trainer

    with ray_session(dashboard=True):
        result = tensorflow_trainer(
            _time_steps,
            train_loop_config=vars(args),
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": args.cpus}),
            run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="digits-probe-")),
        ).fit()
    return result.return_value


def _time_steps(settings: dict) -> dict:
    """Milliseconds per step (medians of several timed runs of `calls` x STEPS_PER_EXECUTION
    steps, after a warm-up), as every worker sees them; rank 0's are returned."""
    import numpy as np

    from digit_models.config import TrainConfig
    from digit_models.nets.models import build_model
    from digit_models.runtime.tf_setup import configure_tensorflow, keras, tf
    from digit_models.training.worker import STEPS_PER_EXECUTION, communication

    configure_tensorflow(settings["cpus"])
    if settings.get("inter_threads"):
        tf.config.threading.set_inter_op_parallelism_threads(settings["inter_threads"])
    config = TrainConfig(model=settings["model"], batch_size=settings["batch"])
    options = communication(config)
    if settings.get("bytes_per_pack"):
        options = tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=settings["bytes_per_pack"], implementation=options.implementation
        )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4096, 28, 28), dtype=np.uint8)
    labels = tf.one_hot(rng.integers(0, 10, 4096), 10)
    data = strategy.distribute_datasets_from_function(
        lambda _: (
            tf.data.Dataset.from_tensor_slices((images, labels))
            .shuffle(4096)
            .batch(config.batch_size, drop_remainder=True)
            .repeat()
            .prefetch(2)
        )
    )
    with strategy.scope():
        model = build_model(config.model, config.dropout)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="categorical_crossentropy",
            steps_per_execution=STEPS_PER_EXECUTION,
        )
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
    def compute_all_reduce(iterator):
        def step(x, y):
            grads = gradients(x, y)
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)

        for _ in tf.range(STEPS_PER_EXECUTION):
            strategy.run(step, args=next(iterator))

    def compute_apply(count_steps: bool):
        @tf.function
        def run(iterator):
            def step(x, y):
                grads = gradients(x, y)
                model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
                if count_steps:  # as Keras's own step does
                    model._train_counter.assign_add(1)

            for _ in tf.range(STEPS_PER_EXECUTION):
                strategy.run(step, args=next(iterator))

        return run

    def all_reduce_as(dtype):
        @tf.function
        def reduce_all():
            def reduce():
                context = tf.distribute.get_replica_context()
                return context.all_reduce(
                    tf.distribute.ReduceOp.SUM, [tf.ones_like(v, dtype=dtype) for v in model.trainable_variables]
                )

            for _ in tf.range(STEPS_PER_EXECUTION):
                strategy.run(reduce)

        return reduce_all

    @tf.function
    def input_only(iterator):
        for _ in tf.range(STEPS_PER_EXECUTION):
            strategy.run(lambda x, y: tf.reduce_sum(x), args=next(iterator))

    class StepTimes(keras.callbacks.Callback):
        """Times of every call of the train function (STEPS_PER_EXECUTION steps each)."""

        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    def whole_steps(variant: str) -> float:
        """Keras's own steps, in one long fit (its per-fit set-up is not a step's cost), with
        a variant of the step: "keras" (as Keras has it), "xla" (Keras's step compiled with
        XLA, jit_compile), or "DTYPE[xK]": the gradients of K micro-batches all-reduced in
        DTYPE (digits' data_parallel_step)."""
        import types

        from digit_models.training.worker import data_parallel_step

        model.jit_compile = variant == "xla"
        if variant in ("keras", "xla"):
            micro = 1
            model.train_step = types.MethodType(type(model).train_step, model)
        else:
            dtype, _, micro = variant.partition("x")
            micro = int(micro or 1)
            model.train_step = types.MethodType(data_parallel_step(getattr(tf, dtype), micro), model)
        model.distribute_reduction_method = settings["reduction"]
        model.train_function = None
        rows = config.batch_size * micro
        steps = strategy.distribute_datasets_from_function(
            lambda _: (
                tf.data.Dataset.from_tensor_slices((images, labels))
                .shuffle(4096)
                .batch(rows, drop_remainder=True)
                .repeat()
                .prefetch(2)
            )
        )
        times = StepTimes()
        model.fit(
            steps, epochs=1, steps_per_epoch=STEPS_PER_EXECUTION * (settings["calls"] + 2), callbacks=[times], verbose=0
        )
        calls = np.diff(times.ends)[2:]  # after a warm-up
        return float(np.median(calls)) * 1000 / STEPS_PER_EXECUTION / micro

    apply_only, apply_counted = compute_apply(False), compute_apply(True)
    timed = {
        "compute": lambda: compute(batches).numpy(),
        "all_reduce": all_reduce_as(tf.float32),
        "input": lambda: input_only(batches),
        "compute_all_reduce": lambda: compute_all_reduce(batches),
        "compute_apply": lambda: apply_only(batches),
        "compute_apply_counter": lambda: apply_counted(batches),
        "all_reduce_float16": all_reduce_as(tf.float16),
        "all_reduce_bfloat16": all_reduce_as(tf.bfloat16),
    }
    result = {}
    for name, call in ({} if settings["skip_parts"] else timed).items():
        call()  # tracing and warm-up
        runs = []
        for _ in range(settings["timings"]):
            began = time.perf_counter()
            for _ in range(settings["calls"]):
                call()
            runs.append((time.perf_counter() - began) * 1000 / (settings["calls"] * STEPS_PER_EXECUTION))
        result[f"{name}_ms"] = sorted(runs)[len(runs) // 2]
    variants = settings["variants"]
    samples = {variant: [] for variant in variants}
    for _ in range(settings["rounds"]):
        for variant in variants:
            samples[variant].append(whole_steps(variant))
    result["ms_per_micro_batch"] = {variant: float(np.median(values)) for variant, values in samples.items()}
    return result


def uncoupled(args) -> dict:
    import numpy as np

    from digit_models.config import TrainConfig
    from digit_models.nets.models import build_model
    from digit_models.runtime.cpu_features import this_cpu_has_bfloat16
    from digit_models.runtime.tf_setup import configure_tensorflow, keras, tf
    from digit_models.storage.kaggle_csv import NUM_CLASSES, read_image_chunks
    from digit_models.training.worker import STEPS_PER_EXECUTION

    policy = TrainConfig(data=args.train_csv, out="-", model=args.model).compute_policy(this_cpu_has_bfloat16())
    configure_tensorflow(args.cpus, policy)
    chunks = read_image_chunks(args.train_csv, labelled=True, limit=args.rows)
    images = np.concatenate([images for images, _ in chunks]).reshape(-1, 28, 28)
    labels = keras.utils.to_categorical(np.concatenate([labels for _, labels in chunks]), NUM_CLASSES)
    batches = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(len(images), seed=0)
        .batch(args.batch, drop_remainder=True)
    )
    model = build_model(args.model)
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    epoch_s = []

    class Timing(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.began)

    model.fit(batches, epochs=args.epochs, callbacks=[Timing()], verbose=0)
    trained = len(images) // args.batch * args.batch
    return {"policy": policy, "images": trained, "images_per_s": [trained / seconds for seconds in epoch_s]}


def policies(args) -> dict:
    import numpy as np

    from digit_models.nets.models import build_model
    from digit_models.runtime.tf_setup import configure_tensorflow, keras, tf

    configure_tensorflow(args.cpus)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch * 8, 28, 28)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 10, len(images)), 10)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch).repeat().prefetch(2)
    models = {}
    for policy in args.policies:
        keras.mixed_precision.set_global_policy(policy)
        models[policy] = build_model(args.model)
        models[policy].compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
        models[policy].fit(data, steps_per_epoch=4, epochs=1, verbose=0)  # tracing and warm-up
    samples = {policy: [] for policy in args.policies}
    for _ in range(args.rounds):
        for policy, model in models.items():
            began = time.perf_counter()
            model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
            samples[policy].append((time.perf_counter() - began) * 1000 / args.steps)
    return {
        "model": args.model,
        "batch": args.batch,
        "ms_per_step": {policy: float(np.median(times)) for policy, times in samples.items()},
        "samples": samples,
    }


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
    step.add_argument("--reduction", default="auto", help="Keras's distribute_reduction_method")
    step.add_argument("--bytes-per-pack", type=int, default=0)
    step.add_argument("--inter-threads", type=int, default=0)
    step.add_argument(
        "--variants",
        nargs="+",
        default=["keras"],
        help="whole steps to time: keras, xla (one worker), or DTYPE[xK] (e.g. bfloat16x2)",
    )
    step.add_argument("--timings", type=int, default=5, help="timed runs of each part (their median is kept)")
    step.add_argument("--rounds", type=int, default=3, help="interleaved timings of every variant")
    step.add_argument("--skip-parts", action="store_true", help="time whole steps only")
    alone = probes.add_parser("uncoupled")
    alone.add_argument("--train-csv", required=True)
    alone.add_argument("--model", default="cnn")
    alone.add_argument("--batch", type=int, default=32)
    alone.add_argument("--cpus", type=int, default=1)
    alone.add_argument("--rows", type=int, default=16_000)
    alone.add_argument("--epochs", type=int, default=3)
    policy = probes.add_parser("policies")
    policy.add_argument("--model", default="deep_cnn")
    policy.add_argument("--batch", type=int, default=128)
    policy.add_argument("--cpus", type=int, default=2)
    policy.add_argument("--steps", type=int, default=10, help="steps per timed fit")
    policy.add_argument("--rounds", type=int, default=3)
    policy.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16", "mixed_float16"])
    args = parser.parse_args()
    if args.probe == "steps" and "xla" in args.variants and args.workers > 1:
        parser.error("--variants xla: one worker only (XLA cannot compile the workers' all-reduce)")
    sys.stdout.write(
        "BENCH "
        + json.dumps(
            {"startup": startup, "steps": steps, "uncoupled": uncoupled, "policies": policies}[args.probe](args)
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

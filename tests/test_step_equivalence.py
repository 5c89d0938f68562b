"""The distributed training step checked against the plain one (issue 39): the same seeded
weights and the same global batch give the same update from two data-parallel workers as from
one plain tf-keras step, with `--all-reduce-dtype float32` and, within bfloat16's rounding,
bfloat16; `--accumulate K` micro-batches of B update as one batch of K x B;
`--scale-learning-rate` moves the weights at the documented rate; and a smaller group resumed
in the middle of an epoch trains on every row once. And `--precision auto` computes in bfloat16
only where every worker's CPU has it.

The two workers are real processes, each with a TF_CONFIG naming both on loopback (what
training/backend.py gives Ray Train's workers), under worker.multi_worker_strategy, with
worker.use_data_parallel_step as run_worker calls it, fed by fit() from worker.EpochOrder's pipeline
as run_worker feeds it: each its own half of the global batch. The plain step is
train_on_batch on the whole global batch in this process.

Most cases update with SGD, not the runs' Adam: Adam's update does not change when every
gradient is scaled alike (up to its epsilon), so a gradient summed where it should be
averaged (the division by the replicas or by --accumulate lost) would not show in the weights
after an Adam step; after an SGD step each weight has moved by the rate times its gradient.
Adam, built by compiled_model as the runs build it, is the case of the learning rate. The
model is the seed's CNN: no BatchNorm or dropout, whose batch statistics or random masks would
differ between a micro-batch and the whole batch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from digit_models.config import TrainConfig
from tests.conftest import REPO

WORLD = 2  # workers
ROWS = 480  # of the MNIST slice: the epoch the global batch is drawn from
SGD_RATE = 0.1  # large enough that a step's weight changes stand well above float32's rounding of the weights
ADAM_RATE, ACCUMULATE, SYNC_EVERY = 1e-3, 3, 3
SCALED_RATE = ADAM_RATE * math.sqrt(WORLD * ACCUMULATE)  # the README's: the rate x sqrt(workers x accumulate)
# What each worker process runs, each case from the same initial weights: the TrainConfig and,
# for an SGD case, its rate (else the optimizer compiled_model builds).
CASES = {
    "float32": dict(sgd_rate=SGD_RATE, config=dict(model="cnn", batch_size=32, all_reduce_dtype="float32")),
    "cpu_default": dict(sgd_rate=SGD_RATE, config=dict(model="cnn", batch_size=32)),  # bfloat16 on CPUs
    "accumulate": dict(
        sgd_rate=SGD_RATE, config=dict(model="cnn", batch_size=16, accumulate=ACCUMULATE, all_reduce_dtype="float32")
    ),
    "sync_every": dict(sgd_rate=SGD_RATE, config=dict(model="cnn", batch_size=16, sync_every=SYNC_EVERY)),
    "scaled_adam": dict(
        sgd_rate=None,
        config=dict(
            model="cnn",
            batch_size=16,
            accumulate=ACCUMULATE,
            learning_rate=ADAM_RATE,
            scale_learning_rate=True,
            all_reduce_dtype="float32",
        ),
    ),
}
# The largest difference float32 arithmetic leaves between the two-worker step's weights and
# the plain step's, as a fraction of the plain step's largest weight change: the gradient is
# summed in another order (two halves, then the all-reduce) and the weights are rounded after
# the update. Seen: 1.2e-6 (float32), 0.9e-6 (accumulate). A lost or doubled gradient,
# micro-batch or worker moves weights by about the change itself.
FLOAT32_TOLERANCE = 1e-5
BFLOAT16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits, rounded to nearest
WORKERS_TIMEOUT_S = 300


def worker_process(spec_json: str) -> None:
    """One of the two workers (run by `two_worker_steps` in a process of its own, TF_CONFIG in
    its environment): every case's one step, from the initial weights, then the weights, the
    optimizer's step count and its learning rate into an .npz file."""
    from digit_models.runtime.tf_setup import configure_tensorflow, keras

    configure_tensorflow(cpus=1)
    from digit_models.training.worker import EpochOrder, compiled_model, multi_worker_strategy, use_data_parallel_step

    spec = json.loads(spec_json)
    with np.load(spec["data"]) as data:
        images, labels = data["images"], data["labels"]
        initial = [data[f"weight{i}"] for i in range(spec["weights"])]
    strategy = multi_worker_strategy(TrainConfig())
    results = {
        "agreed/both": agreed(strategy, lambda: True),
        "agreed/rank0": agreed(strategy, lambda: spec["rank"] == 0),
    }
    for name, case in CASES.items():
        config = TrainConfig(**case["config"])
        order = EpochOrder(len(images), config.global_batch(WORLD), spec["rank"], WORLD, config.seed)
        with strategy.scope():
            model = (
                compiled_model(config, order.steps, WORLD, config.epochs)
                if case["sgd_rate"] is None
                else plain_model(config, keras.optimizers.SGD(case["sgd_rate"]))
            )
        model.set_weights(initial)
        use_data_parallel_step(model, strategy, config)
        fitted = model.fit(
            strategy.distribute_datasets_from_function(_first_batches(order, images, labels)),
            epochs=1,
            steps_per_epoch=1,
            verbose=0,
        )
        results.update({f"{name}/{i}": weights for i, weights in enumerate(model.get_weights())})
        results.update({f"{name}/logged_{metric}": fitted.history[metric][0] for metric in ("loss", "accuracy")})
        results[f"{name}/iterations"] = model.optimizer.iterations.numpy()
        results[f"{name}/learning_rate"] = keras.backend.get_value(model.optimizer.learning_rate)
    np.savez(spec["out"], **results)


def agreed(strategy, cpu_has_bfloat16) -> str:
    """The policy run_worker's `--precision auto` agrees on when this worker's CPU has bfloat16
    or not as `cpu_has_bfloat16()` says."""
    from digit_models.training import worker

    real, worker.this_cpu_has_bfloat16 = worker.this_cpu_has_bfloat16, cpu_has_bfloat16
    try:
        return worker.agreed_policy(strategy, TrainConfig(), WORLD)
    finally:
        worker.this_cpu_has_bfloat16 = real


def _first_batches(order, images, labels):
    """The input function run_worker hands the strategy, from epoch 0's first image (one
    replica per worker, as on CPUs)."""
    return lambda _: order.batches(images, labels, 0, 0, replicas=1, cpus=1)


def plain_model(config: TrainConfig, optimizer, steps_per_execution: int | None = None):
    """The configured model, compiled with `optimizer` and the loss and metrics compiled_model
    gives it (the plain step's train_on_batch takes one step per execution)."""
    from digit_models.nets.models import build_model
    from digit_models.runtime.tf_setup import keras
    from digit_models.training.worker import STEPS_PER_EXECUTION

    model = build_model(config.model)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution or STEPS_PER_EXECUTION,
    )
    return model


def batch_rows(config: TrainConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Epoch 0's first global batch as one worker takes it, and each of two workers' part."""
    from digit_models.training.worker import EpochOrder

    batch = config.global_batch(WORLD)
    whole = EpochOrder(ROWS, batch, 0, 1, config.seed).rows_of(0, 0).numpy()
    return whole, [EpochOrder(ROWS, batch, rank, WORLD, config.seed).rows_of(0, 0).numpy() for rank in range(WORLD)]


@dataclass
class Steps:
    """The steps' inputs, the two workers' results and the plain steps' weights."""

    images: np.ndarray
    labels: np.ndarray
    initial: list[np.ndarray]
    workers: list[dict[str, np.ndarray]]  # each rank's results, keyed as worker_process saves them
    plain: dict[str, list[np.ndarray]]  # each case's weights after the plain step
    plain_logs: dict[str, dict]  # the plain step's loss and accuracy, where it is one step

    def weights(self, case: str, rank: int = 0) -> list[np.ndarray]:
        return [self.workers[rank][f"{case}/{i}"] for i in range(len(self.initial))]

    def largest_change(self, case: str) -> float:
        return max(float(np.abs(after - before).max()) for after, before in zip(self.plain[case], self.initial))

    def largest_difference(self, case: str) -> float:
        return max(float(np.abs(a - b).max()) for a, b in zip(self.weights(case), self.plain[case]))


@pytest.fixture(scope="module")
def two_worker_steps(tmp_path_factory, mnist_slice) -> Steps:
    """Every case's step by two worker processes; meanwhile the plain steps, here."""
    from digit_models.nets.models import build_model
    from digit_models.runtime.tf_setup import keras, tf

    folder = tmp_path_factory.mktemp("steps")
    images, labels = mnist_slice.images[:ROWS], mnist_slice.labels[:ROWS]
    keras.utils.set_random_seed(0)
    initial = build_model("cnn").get_weights()
    np.savez(
        folder / "data.npz",
        images=images,
        labels=labels,
        **{f"weight{i}": weights for i, weights in enumerate(initial)},
    )
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(WORLD)]
    workers = []
    for rank in range(WORLD):
        spec = json.dumps(
            {
                "rank": rank,
                "data": str(folder / "data.npz"),
                "weights": len(initial),
                "out": str(folder / f"rank{rank}.npz"),
            }
        )
        log = open(folder / f"rank{rank}.log", "w")
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"from tests.test_step_equivalence import worker_process; worker_process({spec!r})",
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "TF_CONFIG": json.dumps(
                        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}}
                    ),
                },
            )
        )
        log.close()
    try:
        plain, plain_logs = {}, {}
        for name, case in CASES.items():
            config = TrainConfig(**case["config"])
            rows, parts = batch_rows(config)
            optimizer = (
                keras.optimizers.SGD(case["sgd_rate"]) if case["sgd_rate"] else keras.optimizers.Adam(SCALED_RATE)
            )
            model = plain_model(config, optimizer, steps_per_execution=1)
            if config.sync_every == 1:
                model.set_weights(initial)
                plain_logs[name] = model.train_on_batch(images[rows], tf.one_hot(labels[rows], 10), return_dict=True)
                plain[name] = model.get_weights()
                continue
            # --sync-every: each worker's SGD steps on its own batches in turn, then the average
            alone = []
            for own in parts:
                model.set_weights(initial)
                for batch in np.split(own, config.sync_every):
                    model.train_on_batch(images[batch], tf.one_hot(labels[batch], 10))
                alone.append(model.get_weights())
            plain[name] = [np.mean(worker_weights, axis=0) for worker_weights in zip(*alone)]
        _wait_for_all(workers, [folder / f"rank{rank}.log" for rank in range(WORLD)])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    results = []
    for rank in range(WORLD):
        with np.load(folder / f"rank{rank}.npz") as saved:
            results.append(dict(saved))
    return Steps(images, labels, initial, results, plain, plain_logs)


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback now, all different (held open together while chosen)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _wait_for_all(workers: list[subprocess.Popen], logs: list[Path]) -> None:
    """Until every worker has ended well; a worker that failed ends the wait at once (its
    peer would wait for it in a collective until the timeout), with its log's end."""
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    while any(worker.poll() is None for worker in workers):
        failed = [i for i, worker in enumerate(workers) if worker.poll() not in (None, 0)]
        assert not failed and time.monotonic() < deadline, "\n".join(
            f"rank {i}: {logs[i].read_text()[-3000:]}" for i in failed or range(len(workers))
        )
        time.sleep(0.2)
    failed = [i for i, worker in enumerate(workers) if worker.returncode]
    assert not failed, "\n".join(f"rank {i}: {logs[i].read_text()[-3000:]}" for i in failed)


def test_each_worker_takes_its_own_half_of_the_global_batch():
    """The split the step cases rely on: the global batch one worker would take, halved in
    rank order (so the two workers' sum is the plain step's whole batch, each row once)."""
    for case in CASES.values():
        config = TrainConfig(**case["config"])
        whole, parts = batch_rows(config)
        assert len(set(whole)) == len(whole) == config.global_batch(WORLD)
        assert np.array_equal(np.concatenate(parts), whole)


def test_both_workers_hold_the_same_weights_after_every_step(two_worker_steps):
    """A mirrored variable is one value: the all-reduced update applied alike on each worker,
    bit for bit, and one optimizer step each."""
    for name in CASES:
        assert all(
            np.array_equal(a, b) for a, b in zip(two_worker_steps.weights(name, 0), two_worker_steps.weights(name, 1))
        ), name
        updates = TrainConfig(**CASES[name]["config"]).sync_every
        assert [int(results[f"{name}/iterations"]) for results in two_worker_steps.workers] == [updates, updates]


def test_auto_precision_computes_in_bfloat16_only_where_every_workers_cpu_has_it(two_worker_steps):
    """`--precision auto` on CPUs: both workers' CPUs with bfloat16 instructions, both compute
    in bfloat16; rank 0's alone, both in float32 (not each its own)."""
    for results in two_worker_steps.workers:
        assert (str(results["agreed/both"]), str(results["agreed/rank0"])) == ("mixed_bfloat16", "float32")


def test_a_two_worker_float32_step_is_the_plain_step(two_worker_steps):
    """--all-reduce-dtype float32: the same weights as one plain SGD step on the whole global
    batch, to float32's rounding (FLOAT32_TOLERANCE of the largest change)."""
    change = two_worker_steps.largest_change("float32")
    assert change > 1e-3  # the step moved the weights
    assert two_worker_steps.largest_difference("float32") <= FLOAT32_TOLERANCE * change


def test_the_logged_loss_and_accuracy_are_those_of_both_workers_rows(two_worker_steps):
    """A step returns each worker's own running metrics (no all-reduce per step); the epoch's
    log, which the history, the target stop and TensorBoard read, holds the metrics over both
    workers' rows: the plain step's on the whole global batch, on both workers."""
    logged = [
        {metric: float(results[f"float32/logged_{metric}"]) for metric in ("loss", "accuracy")}
        for results in two_worker_steps.workers
    ]
    plain = two_worker_steps.plain_logs["float32"]
    assert logged[0] == logged[1]
    assert logged[0]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert logged[0]["accuracy"] == pytest.approx(plain["accuracy"], abs=1e-7)


def test_a_bfloat16_all_reduce_differs_only_by_bfloat16_rounding_of_the_gradients(two_worker_steps):
    """The CPU default, bfloat16: each worker's gradient g_r (its half's mean loss halved) is
    rounded to bfloat16 and the sum of the two rounded again, so each summed gradient is off by
    at most (2u + u^2)(|g_0| + |g_1|), u = 2^-8, and each weight by the SGD rate times that
    (plus float32's tolerance). And it is bfloat16: the largest difference is more than a tenth
    of u times the largest change (float32 leaves under FLOAT32_TOLERANCE of it)."""
    from digit_models.nets.models import build_model
    from digit_models.runtime.tf_setup import keras, tf

    steps, u = two_worker_steps, BFLOAT16_UNIT_ROUNDOFF
    model = build_model("cnn")
    model.set_weights(steps.initial)
    loss = keras.losses.CategoricalCrossentropy()
    _, parts = batch_rows(TrainConfig(**CASES["cpu_default"]["config"]))
    halves = []
    for rows in parts:
        with tf.GradientTape() as tape:
            half_loss = loss(tf.one_hot(steps.labels[rows], 10), model(steps.images[rows], training=True)) / WORLD
        halves.append([gradient.numpy() for gradient in tape.gradient(half_loss, model.trainable_variables)])
    change = steps.largest_change("cpu_default")
    for got, plain, first, second in zip(steps.weights("cpu_default"), steps.plain["cpu_default"], *halves):
        bound = SGD_RATE * (2 * u + u * u) * (np.abs(first) + np.abs(second)) + FLOAT32_TOLERANCE * change
        assert (np.abs(got - plain) <= bound).all()
    assert steps.largest_difference("cpu_default") > 0.1 * u * change


def test_k_micro_batches_of_b_update_as_one_batch_of_k_times_b(two_worker_steps):
    """--accumulate 3, --batch-size 16, two workers: each worker's 48 rows in three
    micro-batches, their gradients summed, then all-reduced; the same weights as one plain
    step on the 96 rows (float32's tolerance)."""
    change = two_worker_steps.largest_change("accumulate")
    assert change > 1e-3
    assert two_worker_steps.largest_difference("accumulate") <= FLOAT32_TOLERANCE * change


def test_k_batches_of_local_updates_then_the_weights_averaged(two_worker_steps):
    """--sync-every 3, --batch-size 16, two workers: each worker's 48 rows as three SGD steps of
    its own on 16 rows each, one after another, then the two workers' weights averaged; the
    same weights as the same steps taken here, worker by worker, and averaged (float32's
    tolerance). Three updates each (test_both_workers_hold_the_same_weights_after_every_step)."""
    steps = two_worker_steps
    change = steps.largest_change("sync_every")
    assert change > 1e-3
    assert steps.largest_difference("sync_every") <= FLOAT32_TOLERANCE * change


def test_the_scaled_learning_rate_is_the_documented_one_in_the_optimizer_used(two_worker_steps):
    """--scale-learning-rate with 2 workers and --accumulate 3: the README's rate, 0.001 x
    sqrt(2 x 3), is the compiled optimizer's, and the weights after its Adam step are a plain
    Adam step's at that rate. Adam's first step moves each weight by rate x g / (|g| + 3.2e-6)
    (epsilon over sqrt(1 - beta_2)): the rate itself wherever the gradient is not tiny, so a
    rate off by more than the tolerance, a thousandth of it, fails; float32's rounding of a
    near-zero gradient (1e-9) moves a weight by up to 3e-4 of the rate (seen: 1.3e-4)."""
    steps = two_worker_steps
    for results in steps.workers:
        assert float(results["scaled_adam/learning_rate"]) == pytest.approx(SCALED_RATE, rel=1e-6)
    moved = max(
        float(np.abs(after - before).max()) for after, before in zip(steps.weights("scaled_adam"), steps.initial)
    )
    assert moved == pytest.approx(SCALED_RATE, rel=1e-3)
    assert steps.largest_difference("scaled_adam") <= 1e-3 * SCALED_RATE


def test_run_json_and_the_saved_optimizer_give_the_documented_scaled_rate(tmp_path, kaggle_dir, ray_local):
    """A real run (Ray Train, 2 workers, --accumulate 3, --scale-learning-rate): run.json's
    rate per update and the rate of the optimizer saved with the model are the README's
    0.001 x sqrt(2 x 3), and the optimizer took one step per 3 micro-batches."""
    run, optimizer = _two_worker_run(
        tmp_path, kaggle_dir, accumulate=ACCUMULATE, learning_rate=ADAM_RATE, scale_learning_rate=True
    )
    assert run["learning_rate_per_update"] == pytest.approx(SCALED_RATE, rel=1e-12)
    assert run["global_batch_size"] == 96 and run["accumulate"] == ACCUMULATE
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(SCALED_RATE, rel=1e-6)
    assert int(optimizer.iterations.numpy()) == 360 // 96  # 400 rows less 10% for validation, in updates of 96


def test_a_real_run_with_sync_every_records_it_and_updates_k_times_a_step(tmp_path, kaggle_dir, ray_local):
    """A real run (Ray Train, 2 workers, --sync-every 3, --scale-learning-rate): run.json says
    what the step was, the rate is not scaled (an update is one worker's batch), and the
    optimizer saved with the model took 3 updates per step of 96 rows (16 x 3 x 2)."""
    run, optimizer = _two_worker_run(
        tmp_path, kaggle_dir, sync_every=SYNC_EVERY, learning_rate=ADAM_RATE, scale_learning_rate=True
    )
    assert (run["sync_every"], run["global_batch_size"], run["all_reduce_dtype"]) == (SYNC_EVERY, 96, "float32")
    assert run["learning_rate_per_update"] == ADAM_RATE
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(ADAM_RATE, rel=1e-6)
    assert int(optimizer.iterations.numpy()) == 360 // 96 * SYNC_EVERY


def _two_worker_run(tmp_path, kaggle_dir, **options):
    """run.json and the saved optimizer of a real 1-epoch run of the dense net, 2 workers of one
    CPU, batches of 16, on 400 rows."""
    from digit_models.runtime.tf_setup import keras
    from digit_models.training.driver import train

    config = TrainConfig(
        data=str(kaggle_dir),
        out=str(tmp_path / "run"),
        model="dense",
        workers=WORLD,
        batch_size=16,
        epochs=1,
        limit=400,
        cpus_per_worker=1,
        **options,
    )
    return train(config), keras.models.load_model(tmp_path / "run" / "model.keras").optimizer


def test_a_smaller_group_resumed_mid_epoch_trains_on_every_row_once_per_epoch():
    """Two workers preempted after 7 steps of an epoch (a checkpoint at image 7 x 32, as
    PreemptionNotice counts it), then one worker resumed there as run_worker resumes (the rest
    of that epoch from that image, then the next epoch whole), each fed by EpochOrder's real
    pipeline: in both epochs every row is trained on exactly once, with its own label."""
    from digit_models.training.worker import EpochOrder

    rows, batch, seed, epoch, steps_before = 960, 16, 5, 3, 7  # 960 rows: whole global batches of 16 and 32
    labels = np.random.default_rng(seed).integers(0, 10, rows).astype(np.uint8)

    def trained(world: int, first_epoch: int, start: int, steps: int) -> np.ndarray:
        """The rows `world` workers train on in `steps` steps from epoch `first_epoch`'s image `start`."""
        seen = []
        for rank in range(world):
            order = EpochOrder(rows, batch * world, rank, world, seed)
            for ids, one_hot in order.batches(np.arange(rows), labels, first_epoch, start, replicas=1, cpus=1).take(
                steps
            ):
                assert np.array_equal(one_hot.numpy().argmax(axis=1), labels[ids.numpy()])
                seen.append(ids.numpy())
        return np.concatenate(seen)

    images_done = steps_before * batch * 2
    resumed = EpochOrder(rows, batch, 0, 1, seed)
    interrupted_epoch = np.concatenate(
        [trained(2, epoch, 0, steps_before), trained(1, epoch, images_done, resumed.steps_from(images_done))]
    )
    next_epoch = trained(1, epoch + 1, 0, resumed.steps)
    for seen in (interrupted_epoch, next_epoch):
        assert np.array_equal(np.sort(seen), np.arange(rows))

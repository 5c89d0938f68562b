"""--recompute-batchnorm: each BatchNorm layer's statistics are those of its input when the
model predicts (dropout off, the earlier layers normalising by their new statistics)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from digit_models.training.batchnorm import BATCHNORM_IMAGES, batchnorm_rows, recompute_batchnorm
from digit_models.nets.models import build_model
from digit_models.runtime.tf_setup import keras
from tests.conftest import REPO


def inference_moments(model, images, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per channel of what layer `index` receives when the model predicts."""
    features = keras.Sequential(model.layers[:index])(images, training=False).numpy().astype(np.float64)
    axes = tuple(range(features.ndim - 1))
    return features.mean(axis=axes), features.var(axis=axes)


def test_every_batchnorm_holds_its_inputs_statistics_as_the_model_predicts(mnist_slice):
    model = build_model("deep_cnn")
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(
        mnist_slice.images[:256],
        keras.utils.to_categorical(mnist_slice.labels[:256], 10),
        epochs=1,
        batch_size=64,
        verbose=0,
    )  # running statistics as training leaves them
    norms = [i for i, layer in enumerate(model.layers) if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 7
    images = mnist_slice.images[256:768].astype(np.float32)
    before = inference_moments(model, images, norms[-1])

    recompute_batchnorm(model, images)
    for index in norms:  # the deeper ones depend on the earlier ones' new statistics
        mean, variance = inference_moments(model, images, index)
        layer = model.layers[index]
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-3, atol=1e-3)
    # What the last layer receives changed with the earlier ones' statistics: not a no-op.
    assert not np.allclose(before[1], inference_moments(model, images, norms[-1])[1], rtol=1e-2)


def test_models_without_batchnorm_are_left_as_they_are(mnist_slice):
    model = build_model("cnn")
    weights = [w.copy() for w in model.get_weights()]
    recompute_batchnorm(model, mnist_slice.images[:64].astype(np.float32))
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("rows, world", [(40_000, 1), (40_000, 2), (1_000, 2)])
def test_each_worker_recomputes_from_an_equal_seeded_share(rows, world):
    shares = [batchnorm_rows(rows, rank, world, seed=3) for rank in range(world)]
    for chosen in shares:
        assert len(chosen) == min(rows // world, BATCHNORM_IMAGES // world) == len(np.unique(chosen))
        assert chosen.max() < rows
    assert len(np.unique(np.concatenate(shares))) == sum(map(len, shares))  # no row twice
    np.testing.assert_array_equal(shares[0], batchnorm_rows(rows, 0, world, seed=3))
    if len(shares[0]) < rows:  # a draw, not every row
        assert not np.array_equal(shares[0], batchnorm_rows(rows, 0, world, seed=4))


@pytest.mark.timeout(300)
def test_two_workers_hold_the_statistics_of_their_rows_together(tmp_path, kaggle_dir, ray_local):
    """Under MultiWorkerMirroredStrategy each worker recomputes from its own rows and the
    results are all-reduced: the run's model holds, in every BatchNorm layer, its input's
    statistics over both workers' rows, as the model predicts (after augmented training with
    a weight average, which is what the statistics are recomputed for)."""
    from digit_models.config import TrainConfig
    from digit_models.storage.kaggle_csv import read_train_csv
    from digit_models.storage.row_spool import validation_split
    from digit_models.training.driver import train

    config = TrainConfig(
        data=str(kaggle_dir),
        out=str(tmp_path / "run"),
        model="deep_cnn",
        workers=2,
        cpus_per_worker=1,
        epochs=1,
        limit=600,
        augment=True,
        weight_average=0.9,
        recompute_batchnorm=True,
        dropout=0.25,
        target=1.0,
    )
    train(config)
    digits = read_train_csv(str(kaggle_dir / "train.csv"), limit=config.limit)
    train_rows, _ = validation_split(config.limit, config.val_fraction, config.seed)
    images = np.concatenate(
        [digits.images[train_rows][batchnorm_rows(len(train_rows), rank, 2, config.seed)] for rank in (0, 1)]
    )
    model = keras.models.load_model(tmp_path / "run" / "model.keras", compile=False)
    assert {layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)} == {0.25}
    norms = [i for i, layer in enumerate(model.layers) if isinstance(layer, keras.layers.BatchNormalization)]
    for index in norms:
        mean, variance = inference_moments(model, images, index)
        np.testing.assert_allclose(model.layers[index].moving_mean.numpy(), mean, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(model.layers[index].moving_variance.numpy(), variance, rtol=1e-3, atol=1e-3)


MIXED_FLOAT16_PROBE = """
import json, sys
import numpy as np
from digit_models.runtime.tf_setup import configure_tensorflow
configure_tensorflow(cpus=1, precision_policy="mixed_float16")
from digit_models.training.batchnorm import recompute_batchnorm
from digit_models.storage.kaggle_csv import read_train_csv
from digit_models.nets.models import build_model, computing_in_float32
images = read_train_csv(sys.argv[1], limit=256).images
sixteen = build_model("deep_cnn")
thirty_two = computing_in_float32(sixteen)
for model in (sixteen, thirty_two):
    recompute_batchnorm(model, images)
norms = [(a, b) for a, b in zip(sixteen.layers, thirty_two.layers) if hasattr(a, "moving_variance")]
print(json.dumps({
    "compute": sixteen.layers[2].compute_dtype,
    "statistics_dtypes": sorted({a.moving_variance.dtype.name for a, _ in norms}),
    "largest_difference": max(float(np.abs(a.moving_variance.numpy() / b.moving_variance.numpy() - 1).max())
                              for a, b in norms),
}))
"""


def test_under_float16_the_statistics_stay_float32_and_match_a_float32_pass(kaggle_dir):
    # GPU workers train in float16 under --precision auto (no GPU here: the same code on a CPU)
    done = subprocess.run(
        [sys.executable, "-c", MIXED_FLOAT16_PROBE, str(kaggle_dir / "train.csv")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["compute"] == "float16" and probe["statistics_dtypes"] == ["float32"]
    assert probe["largest_difference"] < 0.02  # float16 activations, float32 statistics

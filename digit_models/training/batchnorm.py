"""`--recompute-batchnorm`: BatchNorm's statistics taken from images as the model will see them.

While it trains, a BatchNorm layer keeps running averages of its input's mean and variance per
channel, as the training steps see them: augmented images, dropout on, and each step's own
weights. The model then predicts on plain images, with dropout off and (with
`--weight-average`) the averaged weights, so those statistics are a little off. With this
option, before each validation (at the epoch's end without one) they are recomputed from a
fixed set of the worker's un-augmented training rows, passed through the model as it predicts,
one BatchNorm layer at a time (each normalised by the statistics just computed for it), and
averaged over the workers so all hold the same. Validation, every checkpoint and the run's
model see them; the training steps normalise by each batch's own statistics and never read
them, so the trained weights are those the run would have had without the option.
"""

from __future__ import annotations

import numpy as np

from digit_models.runtime.tf_setup import keras, tf
from digit_models.training.callbacks import BeforeEvaluation, sum_over_workers

# Across all workers: plenty for 416 channels' means and variances (docs/accuracy.md's
# "BatchNorm statistics" has the measurement), and a forward pass of this many images is a
# second or two per epoch on 2 CPU cores.
BATCHNORM_IMAGES = 2048


def recompute_batchnorm(model: keras.Model, images: np.ndarray, average=lambda values: values) -> None:
    """Sets every BatchNorm layer's moving mean and variance to its input's over `images`,
    with dropout off and the earlier BatchNorm layers normalising by their new statistics.
    `average` combines each layer's [mean, mean of squares] with the other workers'.
    The registered models are Sequential: each layer feeds the next."""
    x = tf.constant(images)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            continue
        if not isinstance(layer, keras.layers.BatchNormalization):
            x = layer(x, training=False)
            continue
        features = tf.cast(x, tf.float32)
        axes = list(range(len(features.shape) - 1))
        local = tf.concat([tf.reduce_mean(features, axes), tf.reduce_mean(tf.square(features), axes)], 0)
        mean, mean_square = np.split(np.asarray(average(local.numpy()), np.float64), 2)
        variance = np.maximum(mean_square - np.square(mean), 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
        x = tf.cast(layer(features, training=False), layer.compute_dtype)


class RecomputedBatchNorm(BeforeEvaluation):
    """Recomputes the statistics once an epoch, after WeightAverage has swapped the average in
    (it comes first in fit()'s callbacks).
    Every worker passes its own rows and all-reduces the result, so each must run it."""

    def __init__(self, strategy, world: int, images: np.ndarray):
        super().__init__()
        self.strategy, self.world, self.images = strategy, world, images

    def prepare(self):
        recompute_batchnorm(
            self.model, self.images, lambda values: sum_over_workers(self.strategy, values, self.world) / self.world
        )


def batchnorm_rows(rows: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Which of the `rows` training rows worker `rank` recomputes from: its share of a seeded
    draw of BATCHNORM_IMAGES (every worker the same count, so the average weighs them alike)."""
    share = min(rows // world, BATCHNORM_IMAGES // world)
    return np.sort(np.random.default_rng(seed).permutation(rows)[rank::world][:share])

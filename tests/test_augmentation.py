"""Augmentation moves real digits a little, keeps their shape and label, and replays from its
seed; the training pipeline applies it to training batches only."""

import numpy as np
import pytest
import tensorflow as tf

from digit_models.nets.augmentation import Augmentation, random_affine
from digit_models.training.worker import EpochOrder, _batches

SEED = tf.constant([3, 7], tf.int64)


def test_shape_dtype_and_ink_are_preserved(mnist_slice):
    images = mnist_slice.images[:64]
    moved = random_affine(images, SEED, Augmentation()).numpy()
    assert moved.shape == images.shape and moved.dtype == np.float32
    assert moved.min() >= 0 and moved.max() <= 255
    # Digits are centred with a margin: a 10% shift or zoom moves ink, it does not crop it away.
    ink_ratio = moved.sum(axis=(1, 2)) / images.sum(axis=(1, 2))
    assert np.all((ink_ratio > 0.7) & (ink_ratio < 1.35))
    assert not np.allclose(moved, images)


def test_the_same_seed_replays_and_another_differs(mnist_slice):
    images = mnist_slice.images[:16]
    first = random_affine(images, SEED, Augmentation()).numpy()
    assert np.array_equal(first, random_affine(images, SEED, Augmentation()).numpy())
    assert not np.allclose(first, random_affine(images, SEED + 1, Augmentation()).numpy())


def test_no_limits_is_the_identity(mnist_slice):
    images = mnist_slice.images[:8]
    still = random_affine(images, SEED, Augmentation(0, 0, 0)).numpy()
    assert np.array_equal(still, images.astype(np.float32))


def test_a_shift_moves_pixels_and_nothing_is_mirrored(mnist_slice):
    """With only shifts allowed, every image equals the original moved by whole or fractional
    pixels: its best match among integer shifts of the original is close, and a mirrored copy
    matches worse."""
    images = mnist_slice.images[:32].astype(np.float32)
    moved = random_affine(images, SEED, Augmentation(0, 0.1, 0)).numpy()
    for original, shifted in zip(images, moved):
        best = min(
            np.abs(np.roll(original, (dy, dx), axis=(0, 1)) - shifted).sum()
            for dy in range(-3, 4)
            for dx in range(-3, 4)
        )
        mirrored = min(
            np.abs(np.roll(original[:, ::-1], (dy, dx), axis=(0, 1)) - shifted).sum()
            for dy in range(-3, 4)
            for dx in range(-3, 4)
        )
        assert best < 0.5 * original.sum() and best < mirrored


def test_training_batches_are_augmented_with_labels_kept_and_validation_untouched(mnist_slice):
    images, labels = mnist_slice.images[:256], mnist_slice.labels[:256]

    order = EpochOrder(len(images), 64, rank=0, world=1, seed=5)

    def first_batches(augmentation=None):
        data = order.batches(images, labels, first_epoch=0, start=0, replicas=1, cpus=1, augmentation=augmentation)
        return [(x.numpy(), y.numpy()) for x, y in data.take(4)]

    plain = first_batches()
    augmented = first_batches(Augmentation())
    for (plain_x, plain_y), (moved_x, moved_y) in zip(plain, augmented):
        assert np.array_equal(plain_y, moved_y)  # same order, labels travel with their images
        assert moved_x.shape == plain_x.shape and not np.allclose(moved_x, plain_x)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(augmented, first_batches(Augmentation())))
    validation = [(x.numpy(), y.numpy()) for x, y in _batches(images, labels, 64, cpus=1)]
    assert np.array_equal(np.concatenate([x for x, _ in validation]), images)
    assert np.array_equal(np.concatenate([y for _, y in validation]).argmax(axis=1), labels)


@pytest.mark.parametrize("name", ["constant", "cosine"])
def test_learning_rate_schedules(name):
    from digit_models.config import TrainConfig
    from digit_models.training.schedule import learning_rate

    config = TrainConfig(learning_rate=1e-3, lr_schedule=name, epochs=12)
    rate = learning_rate(config, steps_per_epoch=100, workers=1, epochs=config.epochs)
    if name == "constant":
        assert rate == 1e-3
        return
    at = [float(rate(step)) for step in (0, 100, 650, 1199, 1200)]
    assert at[0] == pytest.approx(1e-4) and at[1] == pytest.approx(1e-3)  # a one-epoch warm-up
    assert at[1] > at[2] > at[3] > 0 and at[4] == pytest.approx(0, abs=1e-9)  # cosine decay
    short = learning_rate(TrainConfig(learning_rate=1e-3, lr_schedule=name), 100, workers=1, epochs=2)
    assert float(short(20)) == pytest.approx(1e-3) and float(short(19)) < 1e-3  # a tenth of the run
    rate.total_steps.assign(100.0)  # a time budget's plan of one epoch
    assert float(rate(10)) == pytest.approx(1e-3) and float(rate(9)) < 1e-3  # warms up a tenth of it
    assert float(rate(100)) == pytest.approx(0, abs=1e-9)  # and ends at zero


def test_tta_views_are_fixed_small_moves_one_per_extra_view(mnist_slice):
    from digit_models.nets.augmentation import TTA_VIEWS, tta_view
    from digit_models.config import MAX_TTA

    assert len(TTA_VIEWS) == 1 + MAX_TTA
    images = mnist_slice.images[:4]
    assert np.array_equal(tta_view(images, 0).numpy(), images.astype(np.float32))
    right = tta_view(images, 1).numpy()  # (dx, dy) = (1, 0): one pixel to the right
    assert np.array_equal(right[:, :, 1:], images[:, :, :-1].astype(np.float32))
    views = [tta_view(images, view).numpy() for view in range(1, len(TTA_VIEWS))]
    assert all(not np.allclose(view, images) for view in views)
    assert np.array_equal(tta_view(images[:2], 1).numpy(), right[:2])  # batching does not matter


@pytest.mark.parametrize("world_before, world_after", [(2, 1), (1, 2), (2, 2)])
def test_an_epoch_resumed_at_any_image_by_any_group_trains_on_the_images_it_had_left(world_before, world_after):
    """The epoch's order is one seeded permutation whatever the number of workers: the steps
    two workers take, then the rest of the epoch taken by one (or the other way round), are the
    images of that epoch in the order one worker alone would have taken them."""
    rows, step_rows, seed, epoch = 1_000, 16, 3, 2

    def group_steps(world, start, steps):
        orders = [EpochOrder(rows, step_rows * world, rank, world, seed) for rank in range(world)]
        return [
            np.concatenate([order.rows_of(epoch, step, start).numpy() for order in orders]) for step in range(steps)
        ]

    alone = np.concatenate(group_steps(1, 0, EpochOrder(rows, step_rows, 0, 1, seed).steps))
    assert len(set(alone)) == len(alone) == rows - rows % step_rows
    before = np.concatenate(group_steps(world_before, 0, 5))
    start = len(before)
    after_order = EpochOrder(rows, step_rows * world_after, 0, world_after, seed)
    after = np.concatenate(group_steps(world_after, start, after_order.steps_from(start)))
    trained = np.concatenate([before, after])
    assert len(set(trained)) == len(trained)  # no image twice in the epoch
    np.testing.assert_array_equal(trained, alone[: len(trained)])
    assert len(trained) > rows - 2 * step_rows * max(world_before, world_after)  # all but a remainder
    other_epoch = np.concatenate(
        [EpochOrder(rows, step_rows, 0, 1, seed).rows_of(epoch + 1, s).numpy() for s in range(3)]
    )
    assert not np.array_equal(other_epoch, alone[: len(other_epoch)])  # each epoch its own order

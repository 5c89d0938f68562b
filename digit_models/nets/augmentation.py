"""On-the-fly augmentation of digit batches: small random rotations, shifts and zooms.

Never flips: a mirrored 2 is not a 2. Each image of a batch gets its own affine transform,
drawn with TensorFlow's stateless random ops from (seed, batch number), so a run replays
exactly from its seed. Pixels stay on the 0-255 scale the models' first layer expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from digit_models.runtime.tf_setup import tf

SIDE = 28


@dataclass(frozen=True)
class Augmentation:
    rotation_degrees: float = 10.0
    shift_fraction: float = 0.1  # of the image side, each way
    zoom_fraction: float = 0.1  # scale drawn from [1 - zoom, 1 + zoom]


def random_affine(images: tf.Tensor, seed: tf.Tensor, augmentation: Augmentation) -> tf.Tensor:
    """(batch, 28, 28) pixels -> float32 (batch, 28, 28), each image rotated about its centre,
    zoomed and shifted by amounts drawn uniformly within `augmentation`'s limits."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    angle_limit = math.radians(augmentation.rotation_degrees)
    angle = tf.random.stateless_uniform([batch], seeds[0], -angle_limit, angle_limit)
    scale = tf.random.stateless_uniform(
        [batch], seeds[1], 1 - augmentation.zoom_fraction, 1 + augmentation.zoom_fraction
    )
    shift_limit = augmentation.shift_fraction * SIDE
    shift = tf.random.stateless_uniform([batch, 2], seeds[2], -shift_limit, shift_limit)
    return affine(images, angle, scale, shift)


# Test-time views: the image itself, then one-pixel shifts, small rotations and zooms, each a
# (degrees, scale, (dx, dy)); fixed, so that a prediction never depends on how rows were batched.
TTA_VIEWS = [
    (0, 1, (0, 0)),
    (0, 1, (1, 0)),
    (0, 1, (-1, 0)),
    (0, 1, (0, 1)),
    (0, 1, (0, -1)),
    (8, 1, (0, 0)),
    (-8, 1, (0, 0)),
    (0, 1.08, (0, 0)),
    (0, 0.92, (0, 0)),
]


def tta_view(images: tf.Tensor, view: int) -> tf.Tensor:
    degrees, scale, (dx, dy) = TTA_VIEWS[view]
    batch = tf.shape(images)[0]
    return affine(
        images,
        tf.fill([batch], math.radians(degrees)),
        tf.fill([batch], float(scale)),
        tf.tile(tf.constant([[dx, dy]], tf.float32), [batch, 1]),
    )


def affine(images: tf.Tensor, angle: tf.Tensor, scale: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """Rotates each image by angle[i] radians about its centre, scales it by scale[i] and
    shifts it by shift[i] = (dx, dy) pixels; bilinear, with black coming in at the edges."""
    # The op maps each output pixel back to where it comes from: input = R(-angle)(output -
    # centre - shift) / scale + centre, as the 8 numbers of a projective transform.
    centre = (SIDE - 1) / 2
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    x0, y0 = centre + shift[:, 0], centre + shift[:, 1]
    zeros = tf.zeros_like(cos)
    transforms = tf.stack(
        [cos, sin, centre - cos * x0 - sin * y0, -sin, cos, centre + sin * x0 - cos * y0, zeros, zeros], axis=1
    )
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32)[..., tf.newaxis],
        transforms=transforms,
        output_shape=[SIDE, SIDE],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return moved[..., 0]

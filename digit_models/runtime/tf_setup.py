"""TensorFlow for our processes (Ray Train workers, scoring actors): imported without its
start-up noise (runtime/console.py), and set up for the CPUs and GPUs Ray granted."""

from __future__ import annotations

import logging

import digit_models  # noqa: F401  (selects legacy Keras before TensorFlow loads)
from digit_models.runtime.console import startup_noise_filtered

with startup_noise_filtered():
    import tensorflow as tf
    import tf_keras as keras

    GPUS = tf.config.list_physical_devices("GPU")  # CUDA's own lines come with the first look


def configure_tensorflow(cpus: int, precision_policy: str = "float32") -> None:
    """Thread pools sized to the CPUs Ray granted (TensorFlow would size them to the machine,
    and two workers sharing two cores would each run a full set); GPU memory allocated as
    needed rather than all at once, so a GPU can be shared; the Keras dtype policy for the
    models built next. Must run before TensorFlow's first op."""
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(cpus)
    for gpu in GPUS:
        tf.config.experimental.set_memory_growth(gpu, True)
    keras.mixed_precision.set_global_policy(precision_policy)
    tf.get_logger().setLevel(logging.ERROR)
    if not keras.__version__.startswith("2."):
        raise RuntimeError(
            f"legacy Keras (tf-keras 2.x) expected, got Keras {keras.__version__}; "
            "TF_USE_LEGACY_KERAS=1 must be set before TensorFlow is imported"
        )

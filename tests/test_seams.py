"""Every private part of Ray, TensorFlow and tf-keras we rely on (runtime/seams.py) is where it
was read from, and one that has moved ends with one line naming it."""

from __future__ import annotations

import pytest

from digit_models.errors import DigitsError
from digit_models.runtime import seams


def _instance_for(seam: seams.Seam):
    """A built instance of the class whose instances carry the seam's attributes."""
    from digit_models.runtime.tf_setup import keras, tf

    if seam is seams.SUPPORTS_TF_LOGS:
        return keras.callbacks.Callback()
    if seam is seams.MEAN_METRIC_STATE:
        return keras.metrics.Mean()
    optimizer = keras.optimizers.Adam(0.1, use_ema=seam is seams.MOVING_AVERAGE_SLOTS)
    optimizer.build([tf.Variable([1.0])])
    return optimizer


@pytest.mark.parametrize("seam", seams.SEAMS, ids=lambda seam: f"{seam.module}:{','.join(seam.names)}")
def test_the_seam_is_in_the_installed_version(seam):
    if not seam.on_instance:
        found = seams.borrow(seam)
        assert len(seam.names) == 1 or len(found) == len(seam.names)
        return
    instance = _instance_for(seam)
    assert isinstance(
        instance,
        seams.borrow(seams.Seam(seam.package, seam.read_from, seam.module, (seam.names[0].split(".")[0],), seam.why)),
    )
    for name in seam.names:
        assert hasattr(instance, name.split(".")[1]), name


def test_a_moved_seam_is_one_line_naming_it_and_the_versions():
    import importlib.metadata

    moved = seams.Seam("ray", "2.59.0", "ray._private.worker", ("no_longer_here",), "a test")
    with pytest.raises(DigitsError) as refused:
        seams.borrow(moved)
    assert str(refused.value) == (
        f"ray._private.worker.no_longer_here is not in ray {importlib.metadata.version('ray')} (it was read "
        "from 2.59.0, and we rely on it for a test); install the version pyproject.toml pins"
    )
    gone = seams.Seam("tensorflow", "2.21.0", "tensorflow.python.no_such_module", ("x",), "a test")
    with pytest.raises(DigitsError, match=r"^tensorflow.python.no_such_module.x is not in tensorflow "):
        seams.borrow(gone)


def test_replace_sets_the_seam_and_refuses_a_moved_one():
    import ray._private.worker as worker

    saved = seams.borrow(seams.PRINT_TO_STDSTREAM)
    try:
        seams.replace(seams.PRINT_TO_STDSTREAM, print)
        assert worker.print_to_stdstream is print
    finally:
        seams.replace(seams.PRINT_TO_STDSTREAM, saved)
    with pytest.raises(DigitsError, match="no_longer_here is not in ray"):
        seams.replace(seams.Seam("ray", "2.60.0", "ray._private.worker", ("no_longer_here",), "a test"), 1)

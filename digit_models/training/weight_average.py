"""`--weight-average`: an exponential moving average of the weights, kept beside them during
training and used for everything but the training steps themselves.

The optimizer keeps the average (tf-keras's `use_ema`), updated after every step;
`WeightAverage` swaps it with the weights at each epoch's end, before validation, and back as
the next epoch begins. So validation (and a `val_accuracy` target), every checkpoint and the
run's model see the average, and training goes on from the weights themselves. A checkpoint
holds the average as its model and the trained weights in the optimizer's average slots; a
resumed run starts swapped, as after any epoch. BatchNorm's moving statistics stay the trained
weights' (they are averages already, over the last hundred or so steps).
"""

from __future__ import annotations

from contextlib import contextmanager

from digit_models.runtime.tf_setup import keras, tf
from digit_models.runtime import seams
from digit_models.training.callbacks import BeforeEvaluation

# AveragingAdam overrides and calls these; its slots are MOVING_AVERAGE_SLOTS (on instances).
seams.borrow(seams.MOVING_AVERAGE)


@keras.saving.register_keras_serializable(package="digits")
class AveragingAdam(keras.optimizers.Adam):
    """Adam keeping a weight average whose momentum grows to `ema_momentum` as
    (1 + step) / (10 + step), as TensorFlow's ExponentialMovingAverage with num_updates does:
    a constant 0.999 from the first step would average the random start in for thousands of
    steps, and the first epochs' validation would measure that rather than the training.
    The update and the slot lookup are tf-keras 2.21's private methods (pyproject pins <2.22)."""

    def __init__(self, learning_rate, ema_momentum: float, **kwargs):
        super().__init__(learning_rate, use_ema=True, ema_momentum=ema_momentum, **kwargs)

    def _update_model_variables_moving_average(self, var_list):
        step = tf.cast(self.iterations, tf.float32)
        momentum = tf.minimum(self.ema_momentum, (1.0 + step) / (10.0 + step))

        def update(average, variable):
            average.assign(momentum * average + (1.0 - momentum) * variable)

        for variable in var_list:
            self._distribution_strategy.extended.update(
                self._average_of(variable), update, args=(variable,), group=False
            )

    def _average_of(self, variable):
        return self._model_variables_moving_average[self._index_dict[self._var_key(variable)]]

    def get_config(self) -> dict:
        config = super().get_config()
        del config["use_ema"]  # always
        return config


class WeightAverage(BeforeEvaluation):
    """Swaps the weights with their average for validation and the checkpoint (see above).
    fit()'s own last act, copying the average slots into the model, leaves the in-memory model
    with the trained weights; the run's model is its last checkpoint's."""

    def on_epoch_begin(self, epoch, logs=None):
        self._swap()  # unconditionally: a fresh average equals the weights, a checkpoint is swapped
        super().on_epoch_begin(epoch, logs)

    def prepare(self):
        self._swap()

    @contextmanager
    def average_in(self):
        """The weights as an epoch's end leaves them, for a checkpoint within an epoch."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self):
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)  # mixed precision wraps it
        for variable in self.model.trainable_variables:
            average = optimizer._average_of(variable)
            trained = variable.read_value()
            variable.assign(average)
            average.assign(trained)

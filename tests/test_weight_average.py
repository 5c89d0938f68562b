"""--weight-average: what validation and checkpoints see, and what training goes on from."""

import numpy as np
import pytest

from digit_models.training.checkpoints import write_checkpoint
from digit_models.training.handoff import TrainingState
from digit_models.config import TrainConfig
from digit_models.storage.run_dir import RunDir
from digit_models.runtime.tf_setup import keras
from digit_models.training.worker import compiled_model
from digit_models.training.weight_average import WeightAverage


def _weights(model) -> list[np.ndarray]:
    return [variable.numpy() for variable in model.trainable_variables]


def _averages(model) -> list[np.ndarray]:
    return [model.optimizer._average_of(variable).numpy() for variable in model.trainable_variables]


class _Epochs(keras.callbacks.Callback):
    """After WeightAverage (as Checkpointing sees them): each epoch's checkpoint, and the
    model's weights and the optimizer's average slots as each epoch begins and ends."""

    def __init__(self, checkpoints):
        super().__init__()
        self.checkpoints, self.begin, self.end = checkpoints, [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begin.append((_weights(self.model), _averages(self.model)))

    def on_epoch_end(self, epoch, logs=None):
        self.end.append((_weights(self.model), _averages(self.model)))
        (self.checkpoints / str(epoch)).mkdir()
        write_checkpoint(str(self.checkpoints / str(epoch)), self.model, TrainingState(epochs_done=epoch + 1))


def _assert_same(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        np.testing.assert_array_equal(a, b)


def test_validation_and_checkpoints_see_the_average_and_training_goes_on_from_the_weights(tmp_path, mnist_slice):
    images = mnist_slice.images[:512]
    labels = keras.utils.to_categorical(mnist_slice.labels[:512], 10)
    validation = (images[:256], labels[:256])
    model = compiled_model(TrainConfig(model="dense", weight_average=0.9), steps=8, workers=1, epochs=10)
    epochs = _Epochs(tmp_path)
    history = model.fit(
        images,
        labels,
        batch_size=64,
        epochs=3,
        validation_data=validation,
        callbacks=[WeightAverage(), epochs],
        verbose=0,
    ).history
    trained = _weights(model)  # fit's last act copies the optimizer's slots (here: the weights) in

    for epoch in range(3):
        checkpoint = keras.models.load_model(tmp_path / str(epoch) / RunDir.MODEL)
        average, kept = epochs.end[epoch]
        _assert_same(_weights(checkpoint), average)  # the checkpoint's model is the average,
        _assert_same(_averages(checkpoint), kept)  # and its optimizer keeps the trained weights,
        assert not np.allclose(average[0], kept[0])  # which differ from it
        # Validation measured the checkpoint's model.
        assert checkpoint.evaluate(*validation, verbose=0)[1] == pytest.approx(history["val_accuracy"][epoch])
        if epoch:  # each epoch went on from the previous epoch's trained weights
            _assert_same(epochs.begin[epoch][0], epochs.end[epoch - 1][1])
            _assert_same(epochs.begin[epoch][1], epochs.end[epoch - 1][0])
    _assert_same(epochs.end[2][1], trained)

    # A run resumed from the last checkpoint trains on from the weights, not the average.
    resumed = keras.models.load_model(tmp_path / "2" / RunDir.MODEL)
    again = _Epochs(tmp_path / "resumed")
    (tmp_path / "resumed").mkdir()
    resumed.fit(images, labels, batch_size=64, epochs=1, callbacks=[WeightAverage(), again], verbose=0)
    _assert_same(again.begin[0][0], trained)


def test_the_average_starts_short_and_grows_to_its_momentum(mnist_slice):
    """Momentum (1 + step) / (10 + step) at first: after one step the average is nine parts in
    ten the new weights, not a thousandth (a constant 0.999)."""
    model = compiled_model(TrainConfig(model="dense", weight_average=0.999), steps=8, workers=1, epochs=10)
    before, seen = _weights(model), {}
    look = keras.callbacks.LambdaCallback(  # before fit's end copies the average into the model
        on_train_batch_end=lambda *_: seen.update(after=_weights(model), average=_averages(model))
    )
    model.fit(
        mnist_slice.images[:64],
        keras.utils.to_categorical(mnist_slice.labels[:64], 10),
        batch_size=64,
        epochs=1,
        callbacks=[look],
        verbose=0,
    )  # one step
    after, average = seen["after"], seen["average"]
    step_momentum = 1 / 10  # (1 + 0) / (10 + 0): the update runs before the step count grows
    np.testing.assert_allclose(
        average[0], step_momentum * before[0] + (1 - step_momentum) * after[0], rtol=1e-5, atol=1e-7
    )
    assert model.optimizer.get_config()["ema_momentum"] == 0.999


def test_without_a_weight_average_the_model_is_the_weights():
    model = compiled_model(TrainConfig(model="dense"), steps=8, workers=1, epochs=10)
    assert model.optimizer.use_ema is False

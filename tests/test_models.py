"""The registry's models are exactly the seed's architectures, taking raw pixels."""

import numpy as np
import pytest

from digit_models.config import MODEL_NAMES, MODELS_WITH_DROPOUT
from digit_models.errors import DigitsError
from digit_models.nets.models import MODELS, build_model
from digit_models.runtime.tf_setup import keras


def _layer_summary(model):
    return [(type(layer).__name__, layer.count_params()) for layer in model.layers]


def test_dense_is_the_seeds_dense_net():
    model = build_model("dense")
    assert _layer_summary(model) == [
        ("Rescaling", 0),
        ("Flatten", 0),
        ("Dense", 784 * 128 + 128),
        ("Dense", 128 * 10 + 10),
    ]
    assert model.layers[2].activation.__name__ == "relu"
    assert model.layers[3].activation.__name__ == "softmax"


def test_cnn_is_the_seeds_convnet():
    model = build_model("cnn")
    assert _layer_summary(model) == [
        ("Rescaling", 0),
        ("Reshape", 0),
        ("Conv2D", 5 * 5 * 1 * 32 + 32),
        ("MaxPooling2D", 0),
        ("Conv2D", 5 * 5 * 32 * 64 + 64),
        ("MaxPooling2D", 0),
        ("Flatten", 0),
        ("Dense", 4 * 4 * 64 * 512 + 512),
        ("Dense", 512 * 10 + 10),
    ]
    assert [layer.kernel_size for layer in model.layers if type(layer).__name__ == "Conv2D"] == [(5, 5)] * 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_take_raw_pixels_and_return_probabilities(name, mnist_slice):
    model = build_model(name)
    probabilities = model.predict(mnist_slice.images[:8], verbose=0)
    assert probabilities.shape == (8, 10)
    assert probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_an_unknown_model_is_a_clear_error():
    with pytest.raises(DigitsError, match="unknown model 'resnet'; choose one of cnn, deep_cnn, dense"):
        build_model("resnet")


def _dropout_rates(model):  # SpatialDropout layers are Dropout subclasses: counted too
    return [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]


def test_the_config_knows_the_registrys_models_and_which_take_a_dropout_rate():
    assert sorted(MODEL_NAMES) == sorted(MODELS)  # the CLI checks --model before TensorFlow loads
    for name in MODELS:
        default = _dropout_rates(build_model(name))
        if name in MODELS_WITH_DROPOUT:
            assert default and _dropout_rates(build_model(name, dropout=0.15)) == [0.15] * len(default), name
        else:
            assert not default, name
            with pytest.raises(TypeError):
                build_model(name, dropout=0.15)


def test_deep_cnn_has_batchnorm_dropout_and_learned_downsampling():
    model = build_model("deep_cnn")
    kinds = [type(layer).__name__ for layer in model.layers]
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [conv.filters for conv in convs] == [32, 32, 32, 64, 64, 64, 128]
    assert [conv.strides for conv in convs].count((2, 2)) == 2
    assert kinds.count("BatchNormalization") == 7 and kinds.count("Dropout") == 3
    assert "MaxPooling2D" not in kinds


@pytest.mark.parametrize("name", ["deep_cnn"])
def test_a_new_model_learns_in_a_few_steps(name, mnist_slice):
    import tf_keras as keras

    model = build_model(name)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    images, labels = mnist_slice.images[:64], mnist_slice.labels[:64]
    first = model.train_on_batch(images, labels)
    for _ in range(10):
        last = model.train_on_batch(images, labels)
    assert np.isfinite(last) and last < first

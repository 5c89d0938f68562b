"""The model registry: architectures chosen by name.

Every model takes raw 28x28 pixels (0-255, any numeric dtype) and outputs 10 class
probabilities; the scaling to [0, 1] is the model's first layer, so a saved model scores Kaggle
CSV rows as they are. The output layer is float32 even under a mixed-precision policy, as
Keras recommends for a numerically stable softmax.
"""

from __future__ import annotations

from typing import Callable

from digit_models.runtime.tf_setup import keras

layers = keras.layers

from digit_models.errors import DigitsError
from digit_models.nets.model_file import load_model_bytes, read_model_file

MODELS: dict[str, Callable[[], keras.Model]] = {}


def register(name: str):
    def add(builder: Callable[[], keras.Model]):
        MODELS[name] = builder
        return builder

    return add


def build_model(name: str, dropout: float | None = None) -> keras.Model:
    """A fresh, uncompiled model; under a distribution strategy call it inside strategy.scope().
    `dropout`: the rate of its dropout layers, for the models that have them (None: the model's
    own; config.MODELS_WITH_DROPOUT names them)."""
    if name not in MODELS:
        raise DigitsError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]() if dropout is None else MODELS[name](dropout=dropout)


def _pixels_in() -> list[layers.Layer]:
    return [keras.Input(shape=(28, 28), name="pixels"), layers.Rescaling(1.0 / 255.0)]


def _softmax_out() -> layers.Layer:
    return layers.Dense(10, activation="softmax", dtype="float32", name="probabilities")


@register("dense")
def dense() -> keras.Model:
    """The seed's fully connected net."""
    return keras.Sequential(
        [
            *_pixels_in(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            _softmax_out(),
        ],
        name="dense",
    )


@register("cnn")
def cnn() -> keras.Model:
    """The seed's convolutional net."""
    return keras.Sequential(
        [
            *_pixels_in(),
            layers.Reshape((28, 28, 1)),
            layers.Conv2D(32, (5, 5), activation="relu"),
            layers.MaxPooling2D(2, 2),
            layers.Conv2D(64, (5, 5), activation="relu"),
            layers.MaxPooling2D(2, 2),
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            _softmax_out(),
        ],
        name="cnn",
    )


@register("deep_cnn")
def deep_cnn(dropout: float = 0.4) -> keras.Model:
    """Conv blocks of 32, 64 and 128 filters with BatchNorm and dropout, the design of the
    strongest Kaggle Digit Recognizer kernels: two 3x3 convolutions, then a strided 5x5 one
    that learns its own downsampling in place of max pooling. Dropout between the blocks: the
    kernels' 0.4 by default; the `best` preset's short runs use less (config.PRESETS)."""

    def conv(filters: int, size: int, strides: int = 1, padding: str = "valid") -> list[layers.Layer]:
        return [
            layers.Conv2D(filters, size, strides=strides, padding=padding, use_bias=False),
            layers.BatchNormalization(),
            layers.Activation("relu"),
        ]

    return keras.Sequential(
        [
            *_pixels_in(),
            layers.Reshape((28, 28, 1)),
            *conv(32, 3),
            *conv(32, 3),
            *conv(32, 5, strides=2, padding="same"),
            layers.Dropout(dropout),
            *conv(64, 3),
            *conv(64, 3),
            *conv(64, 5, strides=2, padding="same"),
            layers.Dropout(dropout),
            *conv(128, 4),
            layers.Flatten(),
            layers.Dropout(dropout),
            _softmax_out(),
        ],
        name="deep_cnn",
    )


def load_model_file(path: str, name: str | None = None) -> keras.Model:
    """A saved model, checked and loaded in Keras safe mode (nets/model_file.py: a model file cannot
    run code on load), checked to map (28, 28) pixels to 10 probabilities, computing in float32
    (below). `name` is how errors refer to it."""
    name = name or path
    model = load_model_bytes(read_model_file(path, name), name, compile=False)
    if tuple(model.input_shape[1:]) != (28, 28) or tuple(model.output_shape[1:]) != (10,):
        raise DigitsError(
            f"{name}: model maps {model.input_shape} to {model.output_shape}, expected (None, 28, 28) to (None, 10)"
        )
    return computing_in_float32(model)


def computing_in_float32(model: keras.Model) -> keras.Model:
    """The same model and weights, computing in float32. A model trained in 16 bits (--precision)
    is saved computing in 16 bits, which is slow on CPUs (float16) or fails on CPUs without
    bfloat16 instructions (bfloat16); scoring costs little beside training, so a loaded model
    scores in float32 wherever it runs."""
    if all(layer.compute_dtype == "float32" for layer in model.layers):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float32"
    rebuilt = type(model).from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt

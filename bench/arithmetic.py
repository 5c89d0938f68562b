"""The arithmetic side: FLOPs per image of each model, and this machine's float32 and bfloat16
peaks as TensorFlow reaches them (a large matmul on all cores). Prints one JSON line."""

from __future__ import annotations

import json
import statistics
import sys
import time

from digit_models.runtime.tf_setup import tf

from digit_models.nets.models import build_model


def forward_flops(model) -> int:
    """Multiply-adds of the convolutions and dense layers, 2 FLOPs each; the rest (pooling,
    activations, normalization) is a rounding error beside them."""
    flops = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            _, height, width, channels_out = layer.output_shape
            kernel_h, kernel_w = layer.kernel_size
            flops += 2 * height * width * channels_out * kernel_h * kernel_w * layer.input_shape[-1]
        elif kind == "Dense":
            flops += 2 * layer.input_shape[-1] * layer.units
    return flops


def matmul_peak_gflops(dtype=tf.float32, size: int = 2048, repeats: int = 10) -> float:
    a = tf.cast(tf.random.normal([size, size]), dtype)
    b = tf.cast(tf.random.normal([size, size]), dtype)
    tf.matmul(a, b).numpy()  # warm-up
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        tf.matmul(a, b).numpy()
        seconds.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(seconds) / 1e9


def main() -> None:
    models = {}
    for name in sys.argv[1:] or ["dense", "cnn", "deep_cnn"]:
        forward = forward_flops(build_model(name))
        # Backpropagation costs about twice the forward pass: gradients for inputs and weights.
        models[name] = {"inference_flops": forward, "train_flops": 3 * forward}
    peaks = {"peak_gflops": matmul_peak_gflops(), "peak_gflops_bfloat16": matmul_peak_gflops(tf.bfloat16)}
    sys.stdout.write("BENCH " + json.dumps({"models": models, **peaks}) + "\n")


if __name__ == "__main__":
    main()

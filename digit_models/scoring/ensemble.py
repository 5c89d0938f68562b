"""The model(s) of a scoring run, loaded once, answering with class probabilities: averaged over
the members of an ensemble and, with test-time augmentation, over fixed shifted, rotated and
zoomed views of each image. `digits predict`'s actors (predict.py) and `digits serve`'s replicas
(serving/app.py) both score through it, so that the two give the same answers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class Ensemble:
    """Loads each model file (its bytes: the caller may have them from another node) in Keras
    safe mode, checked (nets/models.py), then predicts `batch_size` images per model call."""

    def __init__(self, models: list[bytes], names: list[str], tta: int = 0, batch_size: int = 1024):
        self.batch_size, self.views = batch_size, 1 + tta
        self.models = [self._load(model, name) for model, name in zip(models, names)]

    @staticmethod
    def _load(model: bytes, name: str):
        from digit_models.nets.models import load_model_file
        from digit_models.runtime.tf_setup import tf

        with tempfile.TemporaryDirectory(prefix="digits-model-") as directory:
            path = os.path.join(directory, "model.keras")
            Path(path).write_bytes(model)
            loaded = load_model_file(path, name=name)
        # One traced graph for every batch size: faster per call than predict_on_batch.
        return tf.function(
            lambda images: loaded(images, training=False), input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8)]
        )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(n, 10) float32 probabilities of (n, 28, 28) uint8 images."""
        from digit_models.nets.augmentation import tta_view

        probabilities = np.empty((len(images), 10), np.float32)
        for start in range(0, len(images), self.batch_size):
            part = images[start : start + self.batch_size]
            views = [part, *(tta_view(part, view).numpy() for view in range(1, self.views))]
            probabilities[start : start + len(part)] = np.mean(
                [model(view).numpy() for model in self.models for view in views], axis=0
            )
        return probabilities

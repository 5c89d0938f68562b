"""Request bodies of `digits serve`, read and checked: JSON images and Kaggle-format CSV in, the
answers out. Whatever is wrong with a body is a DigitsError naming it in one line, which the app
returns as HTTP 400."""

from __future__ import annotations

import io
import json

import numpy as np

from digit_models.errors import DigitsError
from digit_models.storage.kaggle_csv import csv_stream_chunks, pixels_of

SIDE = 28
# The largest body read: about 1,500 CSV rows or 2,500 JSON images, at most ~25 MB of Python
# objects while a JSON body is checked. A larger one is refused before it is read.
MAX_BODY_BYTES = 4 << 20
JSON_TYPE, CSV_TYPE = "application/json", "text/csv"


def images_of_json(body: bytes) -> np.ndarray:
    """`{"images": [...]}`, each image a 28x28 array or a row of 784 pixels (as in the Kaggle
    CSV), integers 0-255: (n, 28, 28) uint8."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DigitsError(f"body is not JSON: {exc}") from None
    except RecursionError:  # thousands of nested brackets
        raise DigitsError("body: JSON nested too deeply") from None
    if not isinstance(document, dict) or "images" not in document:
        raise DigitsError('body: expected a JSON object {"images": [...]}')
    images = document["images"]
    if not isinstance(images, list) or not images:
        raise DigitsError('"images": expected a non-empty list of images')
    return np.stack([_image(image, f"images[{index}]") for index, image in enumerate(images)])


def _image(value, where: str) -> np.ndarray:
    if isinstance(value, list) and len(value) == SIDE and all(isinstance(row, list) for row in value):
        for number, row in enumerate(value):
            if len(row) != SIDE:
                raise DigitsError(f"{where}[{number}]: {len(row)} pixels, expected {SIDE}")
        pixels = [pixel for row in value for pixel in row]
    elif isinstance(value, list) and len(value) == SIDE * SIDE:
        pixels = value
    else:
        raise DigitsError(f"{where}: {_shape(value)}; expected a {SIDE}x{SIDE} array or a row of {SIDE * SIDE} pixels")
    for position, pixel in enumerate(pixels):
        if type(pixel) not in (int, float):  # not bool, which JSON's true would become
            raise DigitsError(f"{where}: pixel {_place(position)}: {json.dumps(pixel)[:20]} is not a number")
    array = np.array(pixels, dtype=np.float64)
    bad = np.flatnonzero(~((array >= 0) & (array <= 255) & (array == np.round(array))))
    if len(bad):
        raise DigitsError(f"{where}: pixel {_place(bad[0])}: {pixels[bad[0]]} is not an integer 0-255")
    return array.astype(np.uint8).reshape(SIDE, SIDE)


def _shape(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return f"a JSON {type(value).__name__.replace('dict', 'object').replace('str', 'string')}"


def _place(position: int) -> str:
    return f"{position} (row {position // SIDE}, column {position % SIDE})"


def images_of_csv(body: bytes) -> np.ndarray:
    """A Kaggle test.csv (`pixel0,...,pixel783`, a row per image), checked as `digits predict`
    checks its input: (n, 28, 28) uint8."""
    chunks = csv_stream_chunks(io.BytesIO(body), "CSV body", labelled=False, threads=False)
    return np.concatenate([pixels_of(table) for _, table in chunks])


def answer_json(probabilities: np.ndarray) -> dict:
    """Each image's label and its 10 probabilities (float32 values, exactly as computed)."""
    return {"labels": probabilities.argmax(axis=1).tolist(), "probabilities": probabilities.tolist()}


def answer_csv(probabilities: np.ndarray) -> str:
    """Kaggle's submission format: `ImageId,Label`, ImageId the 1-based row of the CSV body."""
    labels = probabilities.argmax(axis=1)
    return "ImageId,Label\n" + "".join(f"{number},{label}\n" for number, label in enumerate(labels, start=1))

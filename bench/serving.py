"""Serving benchmark: `digits serve` (Ray Serve, requests batched) against the plain server a
user would write (bench/baselines.py `serve`: the standard library's threading HTTP server, one
process, the same model.keras), both running side by side and loaded in turn from this process.

A load is `concurrency` clients, each sending single-image POST /predict requests one after
another over a kept-alive connection, until `requests` answers or `seconds` have passed:
requests/s and the latencies' p50 and p99. Loads are interleaved (plain 1, serve 1, plain 8, ...)
so that the machine's drift hits both alike. Before measuring, both servers must give the same
labels for the images sent.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import footprint, machine
from bench.processes import PYTHON, REPO

CONCURRENCY = (1, 8, 32)
IMAGES = 64  # distinct test images, sent in turn
SERVE_CPUS = 2  # the replica's TensorFlow threads: the machine's 2 cores, as the plain server's


def load_test(run_dir: Path, test_csv: Path, requests: int, seconds: float, repeats: int, scratch: Path) -> dict:
    bodies = [json.dumps({"images": [row]}).encode() for row in _rows(test_csv, IMAGES)]
    with _plain(run_dir / "model.keras", scratch) as plain, _digits_serve(run_dir, scratch) as served:
        same = _labels(plain.port, bodies) == _labels(served.port, bodies)
        samples = {("plain", c): [] for c in CONCURRENCY} | {("serve", c): [] for c in CONCURRENCY}
        for _ in range(repeats):
            for concurrency in CONCURRENCY:
                for name, server in (("plain", plain), ("serve", served)):
                    before = _cpu_s_by_process(server.pid)
                    load = _load(server.port, bodies, concurrency, requests, seconds)
                    after = _cpu_s_by_process(server.pid)
                    load["cpu_ms_per_request"] = {
                        name: round(1000 * (cpu_s - before.get(name, 0.0)) / load["answered"], 2)
                        for name, cpu_s in after.items()
                        if cpu_s - before.get(name, 0.0) > 0
                    }
                    samples[name, concurrency].append(load)
    rows = []
    for (name, concurrency), runs in samples.items():
        best = max(runs, key=lambda run: run["requests_per_s"])  # the least disturbed repeat
        rows.append({"server": name, "concurrency": concurrency, **best})
    return {
        "rows": rows,
        "same_labels": same,
        "requests": requests,
        "seconds": seconds,
        "cpu_flags": machine.cpu_description(),
    }


def _rows(test_csv: Path, count: int) -> list[list[int]]:
    with open(test_csv) as lines:
        next(lines)
        return [[int(value) for value in next(lines).split(",")] for _ in range(count)]


def _load(port: int, bodies: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    latencies, failures, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def finished() -> bool:
        """`requests` answered, or the time is up and something was answered."""
        with lock:
            done = len(latencies) + len(failures)
        return done >= requests or (time.perf_counter() > deadline and done > 0)

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        sent = number
        while not finished():
            began = time.perf_counter()
            try:
                connection.request("POST", "/predict", bodies[sent % len(bodies)], {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                answered = response.status == 200
            except (OSError, http.client.HTTPException):  # a refused or reset connection: counted, then a new one
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                answered = False
            with lock:
                (latencies if answered else failures).append(time.perf_counter() - began)
            sent += concurrency
        connection.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "answered": len(latencies),
        "failed": len(failures),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
    }


def _labels(port: int, bodies: list[bytes]) -> list[int]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    labels = []
    for body in bodies:
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        labels += json.loads(connection.getresponse().read())["labels"]
    connection.close()
    return labels


@dataclass(frozen=True)
class Server:
    port: int
    pid: int  # the command's process; the server's processes are it and its descendants


def _cpu_s_by_process(pid: int) -> dict[str, float]:
    """CPU seconds so far of each kind of process in the server's tree (bench/footprint.py's
    names: `ray::ProxyActor`, `ray::ServeReplica:...`, `driver` for the command itself)."""
    processes: dict = {}
    footprint.read_tree(pid, processes)
    return footprint.by_class(processes)


@contextmanager
def _plain(model_file: Path, scratch: Path):
    port = _free_port()
    with _running(
        [PYTHON, "-m", "bench.baselines", "serve", "--model-file", str(model_file), "--port", str(port)],
        scratch / "plain-serve.log",
        ready='"ready"',
    ) as pid:
        yield Server(port, pid)


@contextmanager
def _digits_serve(run_dir: Path, scratch: Path):
    port = _free_port()
    command = [PYTHON, "-m", "digit_models.cli", "serve", "--run", str(run_dir), "--port", str(port)]
    with _running(
        command + ["--cpus-per-replica", str(SERVE_CPUS)], scratch / "digits-serve.log", ready="serving "
    ) as pid:
        yield Server(port, pid)


@contextmanager
def _running(command: list[str], log: Path, ready: str, seconds: float = 300):
    """A server process (its pid) until the block ends, then SIGTERM (and its exit awaited)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + seconds
        while ready not in log.read_text(errors="replace"):
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"bench: {' '.join(command)} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

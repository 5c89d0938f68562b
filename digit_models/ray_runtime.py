"""Connecting to Ray: an existing cluster, the one a `ray job submit` job runs in, or an
embedded local one started for this command and shut down when it ends."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import contextmanager

import numpy as np

from digit_models import RUNTIME_ENV_VARS


@contextmanager
def ray_session(address: str | None = None):
    """Ray for the length of a command.

    With an address (or RAY_ADDRESS, which `ray job submit` sets for its entrypoint) this
    joins that cluster; otherwise it starts a private local Ray on 127.0.0.1, and stops it
    on the way out, whatever happens.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    runtime_env = {"env_vars": _env_vars_to_add()}
    address = address or os.environ.get("RAY_ADDRESS")
    try:  # a Ctrl-C halfway through ray.init must still stop what it started
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # "local": never attach to whatever cluster /tmp/ray/ray_current_cluster last named.
            # The dashboard process also serves the State API that Ray Train's controller polls;
            # it listens on loopback only.
            ray.init(address="local", runtime_env=runtime_env, include_dashboard=True,
                     dashboard_host="127.0.0.1", log_to_driver=True, _node_ip_address="127.0.0.1")
        if callable(caller_sigterm) and threading.current_thread() is threading.main_thread():
            # ray.init replaces SIGTERM's handler with sys.exit(15); keep the caller's policy.
            signal.signal(signal.SIGTERM, caller_sigterm)
        quiet_ray_data()
        yield
    finally:
        ray.shutdown()


def _env_vars_to_add() -> dict:
    """Our environment variables that Ray's processes do not get already. Inside a `ray job
    submit` job, Ray refuses a driver runtime_env that repeats a variable the job's runtime
    env (cluster/runtime_env.yaml) sets, so those are left out."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    from_job = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {name: value for name, value in RUNTIME_ENV_VARS.items() if name not in from_job}


def cpus_per_process(processes: int) -> int:
    """The default CPUs for each of `processes` training workers or scoring actors: the
    cluster's CPUs shared out, but never more than one node has (a request no single node can
    grant would wait forever)."""
    import ray

    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    share = int(ray.cluster_resources().get("CPU", 1)) // processes
    return max(1, min(share, max(node_cpus, default=1)))


def call_interruptibly(function):
    """Runs function() in a helper thread and returns its result, leaving Ctrl-C and SIGTERM
    to the main thread. Ray Train's fit() installs its own SIGINT handler when called on the
    main thread, which ends the process with status 1 or 0 and skips our cleanup."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001  (re-raised on the main thread)
            outcome["error"] = exc

    on_main_thread = threading.current_thread() is threading.main_thread()
    caller_sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    if caller_sigint is None:  # set outside Python, so it cannot be put back: Python's default
        caller_sigint = signal.default_int_handler
    worker = threading.Thread(target=call, name="digits-ray-call", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            if on_main_thread:
                # Keep Ctrl-C the caller's: a library taking SIGINT over mid-run would swallow
                # it. Installed again each time, as native code can take the signal over
                # without Python's own record of the handler changing.
                signal.signal(signal.SIGINT, caller_sigint)
            worker.join(timeout=0.2)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, caller_sigint)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def quiet_ray_data() -> None:
    """Ray Data logs progress every few seconds, and warns that a job 'will hang' whenever actors
    hold every CPU; our commands print their own summary and check their own output."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def images_dataset(images: np.ndarray, num_blocks: int, **columns: np.ndarray):
    """A Ray Dataset of 28x28 images plus per-image columns (ids, labels), held in the object
    store so that workers on any node can read it."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({**{name: pa.array(values) for name, values in columns.items()},
                      "image": ArrowTensorArray.from_numpy(images)})
    return ray.data.from_arrow(table, override_num_blocks=max(1, min(num_blocks, len(images))))

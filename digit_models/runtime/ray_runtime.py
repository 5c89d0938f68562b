"""Connecting to Ray: an existing cluster, the one a `ray job submit` job runs in, or an
embedded local one started for this command and shut down when it ends."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
from contextlib import contextmanager

from digit_models import RUNTIME_ENV_VARS
from digit_models.runtime import seams
from digit_models.runtime.console import filter_worker_output, live
from digit_models.storage.files import AWS_ENVIRONMENT
from digit_models.runtime.interrupts import keep_sigterm_handler


# An embedded Ray keeps up to this many idle worker processes instead of one per CPU: Ray Data
# and Ray Train start a few actors of their own, and past one per CPU the worker that has just
# read the input would be killed within a second, so writing the output had to start a new
# Python process first.
EMBEDDED_RAY_CONFIG = {"num_workers_soft_limit": 8}
# What an embedded Ray runs only for a cluster, switched off in its processes, which inherit
# these from this one's environment as the Ray starts (a value already set there is kept).
# RAY_enable_metrics_collection: every Ray process records metrics for the node's agent to
# export, and nothing reads an embedded Ray's.
# RAY_TRAIN_ENABLE_PREEMPTION_WATCHER: an actor of every run polls for nodes being drained, and
# an embedded Ray has one node, this machine, which nobody drains.
EMBEDDED_ENVIRONMENT = {"RAY_enable_metrics_collection": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def cluster_address(address: str | None = None) -> str | None:
    """The cluster a command joins (see ray_session); None: it starts an embedded Ray here."""
    return address or os.environ.get("RAY_ADDRESS")


@contextmanager
def ray_session(address: str | None = None, dashboard: bool = False):
    """Ray for the length of a command.

    With an address (or RAY_ADDRESS, which `ray job submit` sets for its entrypoint) this
    joins that cluster; otherwise it starts a private local Ray, and stops it on the way out,
    whatever happens. The private Ray listens on 127.0.0.1 only, and demands a token of its
    own whatever RAY_AUTH_MODE says. `dashboard`: it also runs the dashboard process, which
    serves the State API (without it, Ray Train leaves out its placement group cleaner, the
    one part of it that asks the State API: training/backend.py).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    address = cluster_address(address)
    try:  # a Ctrl-C halfway through ray.init must still stop what it started
        if address:
            _load_auth_settings()
            with _loopback_kept():
                ray.init(
                    address=address,
                    runtime_env={"env_vars": _env_vars_to_add()},
                    log_to_driver=True,
                    logging_level=logging.ERROR,
                )
        else:
            # "local": never attach to whatever cluster /tmp/ray/ray_current_cluster last named.
            # No runtime_env: the processes of a Ray started here inherit this environment,
            # and one would keep Ray from handing work to the workers it starts in advance.
            with (
                _state_api_address_known(dashboard) as dashboard_port,
                _own_token() as auth,
                _inherited_by_ray(EMBEDDED_ENVIRONMENT),
                _loopback_kept(),
            ):
                ray.init(
                    address="local",
                    include_dashboard=dashboard,
                    dashboard_host="127.0.0.1",
                    dashboard_port=dashboard_port,
                    log_to_driver=True,
                    logging_level=logging.ERROR,
                    _node_ip_address="127.0.0.1",
                    _system_config=EMBEDDED_RAY_CONFIG,
                )
            _JOINING.update(auth)
            _EMBEDDED.update(dashboard=dashboard)
        keep_sigterm_handler(caller_sigterm)  # ray.init put in its own
        configure_ray_data()
        filter_worker_output()
        yield
    finally:
        live.clear()
        if address and ray.is_initialized():
            remove_own_placement_groups()
        if not address:
            _stop_autoscaler_monitor()
        ray.shutdown()
        _SESSION_OBJECTS.clear()
        _JOINING.clear()
        _EMBEDDED.clear()


def remove_own_placement_groups() -> None:
    """Removes the placement groups this command's job still holds on the cluster it joined.

    Ray removes a job's group once both the job and the actor that made it are gone; but an
    actor killed while its group was being made (the Ray Train controller of a trial that Ray
    Tune stops at a Ctrl-C) can leave the group registered after the actor's death, holding its
    CPUs until the cluster stops. Detached groups outlive jobs by design and are left alone.
    This asks the State API, which a cluster's head serves unless started without the
    dashboard; where it does not, the groups are left to Ray. The State API is found through
    this command's own cluster: told no address, Ray's client looks for a Ray on this machine,
    and gives up when it finds two (another command's embedded one, say)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    context = ray.get_runtime_context()
    job = context.get_job_id()
    try:
        held = list_placement_groups(
            address=context.gcs_address,
            filters=[("creator_job_id", "=", job), ("state", "!=", "REMOVED"), ("is_detached", "=", False)],
            detail=True,
            timeout=10,
            raise_on_missing_output=False,
        )
    except Exception as exc:  # no State API here, or it did not answer: nothing to act on
        logging.getLogger(__name__).debug("placement groups of job %s not listed: %s", job, exc)
        return
    for group in held:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))


def count_nodes_now(wait_s: float = 10.0) -> None:
    """Has Ray Data's autoscaling coordinator (a detached actor, one per cluster; started here
    if none runs yet) count the cluster's nodes now. Ray Train sizes an elastic worker group by
    what the coordinator reserves, from the nodes it counted last, which it does every 20 s on
    its own: sized from an older count, a group is given workers on a node that has gone, and
    waits out Ray Train's start timeout before it tries again without it; or it leaves out a
    node that has just joined until its next resize check, a minute on. Waits up to `wait_s`
    for the count (0: not at all); one that fails or takes longer leaves the next of its own."""
    import ray

    coordinator = seams.borrow(seams.AUTOSCALING_COORDINATOR)()
    seams.borrow(seams.NODE_COUNT)
    counted = coordinator.get_reserved_resources.remote(NODE_COUNT_REQUESTER, recompute=True)
    if wait_s:
        try:
            ray.get(counted, timeout=wait_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            logging.getLogger(__name__).debug("the autoscaling coordinator did not count the nodes: %s", exc)


# Who asks for the count: no request of resources is under this name, so none is changed.
NODE_COUNT_REQUESTER = "digits-node-count"


# While this process runs an embedded Ray: the token that another process needs to join it,
# and whether the Ray runs the dashboard.
_JOINING: dict[str, str] = {}
_EMBEDDED: dict[str, bool] = {}


def state_api_served() -> bool:
    """Whether the Ray this process uses serves the State API: a cluster's head runs the
    dashboard that serves it (`ray start --head` does unless told not to), and an embedded Ray
    does when started with it."""
    return _EMBEDDED.get("dashboard", True)


def joining_environment() -> dict[str, str]:
    """The environment in which another process on this machine joins the Ray this one is
    connected to (the tests run `digits` commands in the session's embedded Ray so)."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, **_JOINING}


@contextmanager
def _own_token():
    """Token authentication for the Ray about to start here, whatever the user's RAY_AUTH_MODE,
    with a new random token that no file holds (Ray would otherwise write one to
    ~/.ray/auth_token, readable by every user). The Ray's processes inherit it from this
    environment while it starts, ahead of RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token; this
    process keeps it loaded. Yields the variables that set it."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {name: os.environ.get(name) for name in auth}
    os.environ.update(auth)
    _load_auth_settings()
    try:
        yield auth
    finally:  # this process's own later commands must not find it
        _restore_environment(saved)


@contextmanager
def _inherited_by_ray(variables: dict[str, str]):
    """`variables` in this process's environment while the Ray about to start here takes its
    processes' environment from it (a value already set is kept); then as before, so that the
    processes this one starts later (a cluster's nodes, in the tests) and its own later
    commands do not find them."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: value for name, value in variables.items() if saved[name] is None})
    try:
        yield
    finally:
        _restore_environment(saved)


def _load_auth_settings() -> None:
    """Make Ray in this process read the authentication mode and token from the environment
    again: it reads both once and keeps them (an earlier session's token too)."""
    Config, AuthenticationTokenLoader = seams.borrow(seams.AUTH_SETTINGS)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def _loopback_kept():
    """Ray 2.60's ray.init replaces a loopback address, of the node it starts or of the cluster
    it joins, with the machine's LAN address, unless multi-node clusters are switched off (as
    on macOS and Windows). The GCS, raylet, object manager, agents and workers of a Ray whose
    node address is the LAN's listen on every interface; with 127.0.0.1 they listen on
    loopback only, and a process joining such a Ray at 127.0.0.1 must connect there."""
    saved = seams.borrow(seams.RAY_CLUSTER_SWITCH)
    seams.replace(seams.RAY_CLUSTER_SWITCH, False)
    try:
        yield
    finally:
        seams.replace(seams.RAY_CLUSTER_SWITCH, saved)


def _restore_environment(saved: dict) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def _state_api_address_known(dashboard: bool):
    """The dashboard's port, chosen here, and its address in the environment that the Ray
    about to start hands down to its processes. Ray Train's placement-group cleaner and state
    actor look for the State API by looking for a Ray on this machine, and die with a traceback
    when there are two (another command's, say); told the address, they look no further."""
    if not dashboard:
        yield None
        return
    port = _free_loopback_port()
    saved = os.environ.get(API_SERVER_ADDRESS)
    os.environ[API_SERVER_ADDRESS] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:  # this process's own later commands must not find it
        _restore_environment({API_SERVER_ADDRESS: saved})


API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
# Ports Ray takes by default whenever they are free, which a port chosen free could be.
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365}


def _free_loopback_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def _stop_autoscaler_monitor() -> None:
    """An embedded Ray's autoscaler monitor has nothing to scale, and takes a second to answer
    the SIGTERM that ray.shutdown() sends it before waiting: stopped outright, a second sooner."""
    node = seams.borrow(seams.GLOBAL_NODE)
    for process in node.all_processes.get("monitor", []) if node else []:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


_SESSION_OBJECTS: list = []


def put_for_session(value):
    """ray.put, with the object kept until Ray shuts down rather than until the caller lets go
    of it: an actor still starting when its pipeline has failed would otherwise find its
    constructor's argument gone, and print Ray's object-store report on the console."""
    import ray

    reference = ray.put(value)
    _SESSION_OBJECTS.append(reference)
    return reference


def on_this_node() -> dict:
    """Ray task options that keep a task on this (the driver's) node: for reading and writing
    local paths, which other nodes of a cluster cannot see."""
    import ray

    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def _env_vars_to_add() -> dict:
    """Our environment variables that Ray's processes do not get already. Inside a `ray job
    submit` job, Ray refuses a driver runtime_env that repeats a variable the job's runtime
    env (cluster/runtime_env.yaml) sets, so those are left out.

    The driver's S3 settings go too (the standard AWS variables it has): the processes of a
    cluster we join were started by its nodes, not by us, so they lack the endpoint and keys
    with which the driver checked the run directory and input, and their checkpoint writes and
    reads of the data would go to another store, or be refused. Whoever may read the job's
    runtime env on that cluster (its dashboard, for one) sees them; a driver without them set
    (credentials from an instance role or a service account) forwards none."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    from_job = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    s3_settings = {name: os.environ[name] for name in AWS_ENVIRONMENT if name in os.environ}
    return {name: value for name, value in {**RUNTIME_ENV_VARS, **s3_settings}.items() if name not in from_job}


def cpus_per_process(processes: int) -> int:
    """The default CPUs for each of `processes` training workers or scoring actors: the
    cluster's CPUs shared out, but never more than one node has (a request no single node can
    grant would wait forever)."""
    import ray

    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    share = int(ray.cluster_resources().get("CPU", 1)) // processes
    return max(1, min(share, max(node_cpus, default=1)))


def configure_ray_data() -> None:
    """Ray Data logs progress every few seconds, warns that a job 'will hang' whenever actors
    hold every CPU, and logs a failed task's traceback twice before raising it; our commands
    print their own summary, check their own output, and say what failed in one line. It
    would also wrap our own errors raised in a batch (bad input, a model that will not load)
    in an exception that reaches the driver without them."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)

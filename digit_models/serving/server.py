"""Starting, swapping and stopping `digits serve`'s application on Ray Serve.

The runs' model files are read and checked here, before Ray starts (a bad one is refused in one
line), and reach the replicas as bytes through Ray, so that replicas on other nodes need not see
this disk. Serve's HTTP proxy listens on 127.0.0.1 only (docs/security.md).

A swap is a redeployment of the same application with other runs: Serve starts the new replicas,
routes new requests to them once they are ready, and stops the old ones only after they have
answered the requests they hold. Stopping (Ctrl-C, SIGTERM) deletes the application the same
way: replicas answer what they hold first.
"""

from __future__ import annotations

import errno
import logging
import socket
from contextlib import contextmanager

from digit_models.config import ServeConfig
from digit_models.errors import DigitsError
from digit_models.runtime.ray_runtime import cluster_address, ray_session
from digit_models.scoring.predict import checked_models
from digit_models.serving.bodies import MAX_BODY_BYTES
from digit_models.storage.run_dir import RunDir

HOST = "127.0.0.1"
# Serve's controller, proxies and replicas log every start, route change and request to the
# console; the command prints its own lines, and Serve's stay in Ray's logs.
QUIET = {"log_level": "ERROR", "enable_access_log": False}


@contextmanager
def serving(config: ServeConfig, address: str | None = None):
    """Serves config.runs until the block ends (an interrupt included); yields the URL. On a
    cluster (`address`, RAY_ADDRESS) Serve's proxy listens on every node that has a replica."""
    config.validate()
    runs, models = checked_models(config.runs)
    if not cluster_address(address):
        _require_free_port(config.port)
    with ray_session(address):
        from ray import serve

        from digit_models.serving.app import APP_NAME

        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        serve.start(http_options={"host": HOST, "port": config.port}, logging_config=QUIET)
        try:
            _deploy(runs, models, config)
            yield f"http://{HOST}:{config.port}/"
        finally:
            serve.delete(APP_NAME)  # its replicas answer the requests they hold first
            if not serve.status().applications:
                serve.shutdown()


def swap(config: ServeConfig, address: str | None = None) -> None:
    """Switches the `digits serve` application running on the cluster at `address` (or
    RAY_ADDRESS) to config.runs, with config's TTA and replicas, without dropping a request;
    returns once the new model answers."""
    config.validate()
    if not cluster_address(address):
        raise DigitsError("--swap: give --address (or RAY_ADDRESS): the Ray cluster `digits serve` runs on")
    runs, models = checked_models(config.runs)
    with ray_session(address):
        from ray import serve
        from ray.serve.exceptions import RayServeException

        from digit_models.serving.app import APP_NAME

        try:
            running = APP_NAME in serve.status().applications
        except RayServeException:
            running = False
        if not running:
            raise DigitsError(f"--swap: no `digits serve` on the cluster at {cluster_address(address)}")
        _deploy(runs, models, config)


def _deploy(runs: list[RunDir], models: list[bytes], config: ServeConfig) -> None:
    """Deploys (or redeploys) the application; returns once its replicas answer."""
    from ray import serve

    from digit_models.serving.app import APP_NAME, application

    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    serve.run(
        application(models, _names(runs), describe(runs, config), config),
        name=APP_NAME,
        route_prefix="/",
        logging_config=QUIET,
    )


def describe(runs: list[RunDir], config: ServeConfig) -> dict:
    """What GET /model answers: the runs, each run.json's gist, the test-time augmentation."""
    return {
        "runs": [str(run) for run in runs],
        "summaries": [_summary(run.read_run()) for run in runs],
        "tta_extra_views": config.tta,
        "views_per_image": 1 + config.tta,
        "replicas": config.replicas,
        "max_body_bytes": MAX_BODY_BYTES,
    }


def _summary(run: dict) -> dict:
    kept = next((epoch for epoch in run.get("history", []) if epoch.get("epoch") == run.get("model_epoch")), {})
    return {
        **{key: run.get(key) for key in ("model", "workers", "epochs_run", "stop_reason", "model_epoch")},
        **{key: kept[key] for key in ("accuracy", "val_accuracy") if key in kept},
    }


def _names(runs: list[RunDir]) -> list[str]:
    return [run.child(run.MODEL) for run in runs]


def _require_free_port(port: int) -> None:
    """Before Ray starts: a port taken here would fail Serve's proxy after a minute of retries."""
    with socket.socket() as probe:
        # As the proxy will: a port left in TIME_WAIT by a server just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise DigitsError(f"--port {port}: cannot listen on {HOST}:{port} ({reason})") from None

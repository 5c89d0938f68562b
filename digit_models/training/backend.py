"""Ray Train's TensorFlow worker set-up, in a module that does not import TensorFlow.

Ray's TensorflowTrainer lives in a package whose `__init__` imports TensorFlow, so the driver
and Ray Train's controller, which only start the workers, would each spend seconds importing
it before the first step (BENCHMARKS.md, start-up). This does the same job as Ray's TensorFlow
backend: before train_func runs, every worker of a group of several gets TF_CONFIG, the list
of all workers' addresses that MultiWorkerMirroredStrategy connects by, and its own index in it.

A group of one worker (a 1-worker run, or an elastic group that shrank to one) gets no
TF_CONFIG, and loses any it inherited: MultiWorkerMirroredStrategy then runs on the worker's
own devices, with the same collectives between them, and starts no gRPC server. TensorFlow binds
that server to every interface whatever address TF_CONFIG gives (docs/security.md), so a group
of one, which has no peer to reach, opens no port at all.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from digit_models.runtime import seams
from digit_models.runtime.ray_runtime import count_nodes_now, state_api_served

# AbortableTrainer overrides these; an override of a method that has gone would do nothing.
seams.borrow(seams.TRAINER_CALLBACKS)
seams.borrow(seams.TRAINER_SIGINT)


@dataclass
class MultiWorkerTensorflowConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _MultiWorkerTensorflowBackend

    @property
    def framework(self):
        return seams.borrow(seams.TRAINING_FRAMEWORK).TENSORFLOW  # how Ray's state API labels the run


def tensorflow_trainer(train_func, controller_callbacks=(), **options) -> AbortableTrainer:
    trainer = AbortableTrainer(train_func, backend_config=MultiWorkerTensorflowConfig(), **options)
    trainer.controller_callbacks = list(controller_callbacks)
    return trainer


class AbortableTrainer(DataParallelTrainer):
    """Ray Train's trainer, with Ctrl-C and SIGTERM left to the caller.

    Ray's fit() installs a SIGINT handler that ends the process with status 0 or 1, skipping
    the caller's cleanup. This one keeps the run's controller instead (the hook is Ray 2.60's,
    the version pyproject.toml pins), so that fit() is interrupted like any call (by
    KeyboardInterrupt, which runtime/interrupts.py raises for SIGTERM too) and then stops the run
    itself: the controller stops the workers and ends, and nothing is left using this
    process's connection to Ray when the caller shuts Ray down. (Waiting on fit() in a helper
    thread instead left that thread inside Ray while the caller shut Ray down; one Ctrl-C in
    CI ended in SIGSEGV.)
    """

    _controller = None
    controller_callbacks: list = []

    def _create_default_callbacks(self):
        """Ray Train's own callbacks and ours: RunConfig takes only user callbacks, whose hooks
        do not see the controller's states (attempts.WorkerGroupWatch needs them).

        Without the State API (an embedded Ray started without the dashboard) Ray's placement
        group cleaner is left out: it asks the State API every second whether the controller
        lives, to remove the workers' placement group if it died, and an embedded Ray ends with
        the command anyway. A run given no Ray Datasets (ours never are) goes without the
        callback that hands them out: it starts an actor for them at every worker group's
        start, a Python process competing for the CPUs while the workers import TensorFlow."""
        own = super()._create_default_callbacks()
        if not state_api_served():
            cleaner = seams.borrow(seams.PLACEMENT_GROUP_CLEANER)
            own = [callback for callback in own if not isinstance(callback, cleaner)]
        if not self.datasets:
            datasets = seams.borrow(seams.DATASETS_CALLBACK)
            own = [callback for callback in own if not isinstance(callback, datasets)]
        return [*own, *self.controller_callbacks]

    def _register_sigint_handler(self, controller) -> None:
        self._controller = controller

    def fit(self):
        # Ray Train's controller asks Ray Data's autoscaling coordinator (a detached actor, one
        # per cluster) for the group's resources before it starts the workers, and would start
        # it then if none runs yet: a Python process that the start-up waited for. Started
        # here, it starts beside the controller; one already running counts the nodes the
        # cluster has now, so that an elastic group is sized by them (not waited for).
        count_nodes_now(wait_s=0)
        try:
            return super().fit()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        if self._controller is None:
            return
        try:  # the controller ends itself once the workers are stopped
            ray.get(self._controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        ray.kill(self._controller)  # already gone, or hung: stopped outright


ABORT_TIMEOUT_S = 30


class _MultiWorkerTensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: MultiWorkerTensorflowConfig) -> None:
        """Called by Ray Train at every worker group's start, restarts and resizes too."""
        if len(worker_group) == 1:
            worker_group.execute(_clear_tf_config)
            return
        addresses = worker_group.execute(_free_address)
        ray.get(
            [
                worker_group.execute_single_async(index, _set_tf_config, addresses, index)
                for index in range(len(addresses))
            ]
        )


def _free_address() -> str:
    """This worker's node address and a port free on it, for TensorFlow's collective server."""
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _clear_tf_config() -> None:
    os.environ.pop("TF_CONFIG", None)

"""Ray Train's TensorFlow worker set-up, in a module that does not import TensorFlow.

Ray's TensorflowTrainer lives in a package whose `__init__` imports TensorFlow, so the driver
and Ray Train's controller, which only start the workers, would each spend seconds importing
it before the first step (BENCHMARKS.md, start-up). This does the same job as Ray's TensorFlow
backend: before train_func runs, every worker gets TF_CONFIG, the list of all workers'
addresses that MultiWorkerMirroredStrategy connects by, and its own index in it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


@dataclass
class MultiWorkerTensorflowConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _MultiWorkerTensorflowBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW  # how Ray's state API labels the run


def tensorflow_trainer(train_func, **options) -> DataParallelTrainer:
    return DataParallelTrainer(train_func, backend_config=MultiWorkerTensorflowConfig(), **options)


class _MultiWorkerTensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: MultiWorkerTensorflowConfig) -> None:
        addresses = worker_group.execute(_free_address)
        ray.get([worker_group.execute_single_async(index, _set_tf_config, addresses, index)
                 for index in range(len(addresses))])


def _free_address() -> str:
    """This worker's node address and a port free on it, for TensorFlow's collective server."""
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                          "task": {"type": "worker", "index": index}})

"""Every private part of Ray, TensorFlow and tf-keras this project relies on, listed in one place.

Each `Seam` names one: the module it lives in, the names used there, what we use it for, and the
version of its package it was read from. The code that relies on a seam gets it through
`borrow()`, which imports it and, where the installed version no longer has it, ends with one
line naming the seam, the installed version and the one it was read from, instead of an
AttributeError deep inside a worker. A method we override is a seam too: an override of a
method its class no longer has would silently do nothing, so the module that overrides one
borrows it too, as a check.
Attributes that only instances carry (`on_instance`) cannot be checked before the instance
exists; tests/test_seams.py checks every seam, those by building the instance.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

from digit_models.errors import DigitsError


@dataclass(frozen=True)
class Seam:
    package: str  # the distribution that has it (its installed version goes into the error)
    read_from: str  # the version of that distribution the seam was read from
    module: str
    names: tuple[str, ...]  # attributes of the module; "Class.attribute" for one of a class
    why: str
    on_instance: bool = False  # the names are set on instances of the class, not the class


RAY, TENSORFLOW, TF_KERAS = ("ray", "2.60.0"), ("tensorflow", "2.21.0"), ("tf-keras", "2.21.0")

# Ray Train V2's controller, for the run's record of worker groups (training/attempts.py).
CONTROLLER_CALLBACK = Seam(
    *RAY,
    "ray.train.v2._internal.execution.callback",
    ("ControllerCallback",),
    "the controller's hooks: every state change of a run's worker group",
)
CONTROLLER_STATES = Seam(
    *RAY,
    "ray.train.v2._internal.execution.controller.state",
    ("SchedulingState", "RunningState", "ResizingState", "RestartingState", "ReschedulingState"),
    "which state the controller is in: starting, running, resizing, restarting",
)
PREEMPTION_FAILURE = Seam(
    *RAY,
    "ray.train.v2._internal.execution.failure_handling.default",
    ("_is_preemption_failure",),
    "whether a worker group ended by a preemption (counted apart from failures)",
)
# Ray Train V2's trainer, which training/backend.py extends.
TRAINER_CALLBACKS = Seam(
    *RAY,
    "ray.train.v2.api.data_parallel_trainer",
    ("DataParallelTrainer._create_default_callbacks",),
    "overridden: adds our controller callbacks to Ray Train's own",
)
PLACEMENT_GROUP_CLEANER = Seam(
    *RAY,
    "ray.train.v2._internal.callbacks.placement_group_callback",
    ("PlacementGroupCleanerCallback",),
    "left out of the default callbacks on an embedded Ray without the dashboard, whose State API it polls",
)
DATASETS_CALLBACK = Seam(
    *RAY,
    "ray.train.v2._internal.callbacks.datasets",
    ("DatasetsCallback",),
    "left out of the default callbacks of a run given no Ray Datasets: it starts an actor to hand them out",
)
AUTOSCALING_COORDINATOR = Seam(
    *RAY,
    "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
    ("get_or_create_autoscaling_coordinator",),
    "started by the driver beside Ray Train's controller, which otherwise waits for it to start",
)
NODE_COUNT = Seam(
    *RAY,
    "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
    ("_AutoscalingCoordinatorActor.get_reserved_resources",),
    "asked with recompute=True to count the cluster's nodes now, which it does every 20 s on its own",
)
TRAINER_SIGINT = Seam(
    *RAY,
    "ray.train.v2.api.data_parallel_trainer",
    ("DataParallelTrainer._register_sigint_handler",),
    "overridden: keeps the controller instead of Ray's SIGINT handler, which exits",
)
TRAINING_FRAMEWORK = Seam(
    *RAY,
    "ray.train.v2._internal.util",
    ("TrainingFramework",),
    "how Ray's state API labels a run's framework (TensorFlow)",
)
TRAIN_CONTEXT = Seam(
    *RAY,
    "ray.train.v2._internal.execution",
    ("context",),
    "the module whose file names the logger that logs every report() at INFO",
)
# Ray's driver-side printing of worker output (runtime/console.py, runtime/ray_runtime.py).
STDSTREAM_DISPATCHER = Seam(
    *RAY,
    "ray._private.ray_logging",
    ("global_worker_stdstream_dispatcher",),
    "the handler that prints worker output on the driver, replaced by a filter",
)
PRINT_TO_STDSTREAM = Seam(
    *RAY,
    "ray._private.worker",
    ("print_to_stdstream",),
    "what prints the raylet's error messages on the driver, wrapped by a filter",
)
GLOBAL_NODE = Seam(
    *RAY,
    "ray._private.worker",
    ("_global_node",),
    "the embedded Ray's processes, to stop its autoscaler monitor at once",
)
# Ray on loopback with a token of its own (runtime/ray_runtime.py, cluster/local_cluster.sh).
RAY_CLUSTER_SWITCH = Seam(
    *RAY,
    "ray._private.ray_constants",
    ("ENABLE_RAY_CLUSTER",),
    "switched off while Ray starts, so that 127.0.0.1 is not replaced by the LAN address",
)
AUTH_SETTINGS = Seam(
    *RAY,
    "ray._raylet",
    ("Config", "AuthenticationTokenLoader"),
    "reading the token authentication settings from the environment again",
)
LOCALHOST_RESOLUTION = Seam(
    *RAY,
    "ray._private.services",
    ("resolve_ip_for_localhost",),
    "replaced in local_cluster.sh's `ray start` of a worker node, which then keeps the head's 127.0.0.1",
)
# TensorFlow's distribution internals (training/worker.py).
CHECK_HEALTH = Seam(
    *TENSORFLOW,
    "tensorflow.python.distribute.collective_all_reduce_strategy",
    ("CollectiveAllReduceExtended._enable_check_health",),
    "turns off the peer health check whose 30 s sleep delayed every run's end",
)
COORDINATION_SERVICE = Seam(
    *TENSORFLOW,
    "tensorflow.python.eager.context",
    ("context",),
    "the eager context, to set the coordination service's heartbeat timeout before the strategy does",
)
COORDINATED_JOB = Seam(
    *TENSORFLOW,
    "tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2",
    ("CoordinatedJob",),
    "the jobs the coordination service watches, as the strategy lists them",
)
DEVICE_DATASET = Seam(
    *TENSORFLOW,
    "tensorflow.python.data.ops.multi_device_iterator_ops",
    ("_create_device_dataset",),
    "wrapped to build the per-device input pipelines without autotuning",
)
# tf-keras's optimizer and callback internals.
MOVING_AVERAGE = Seam(
    *TF_KERAS,
    "tf_keras.src.optimizers.optimizer",
    ("Optimizer._update_model_variables_moving_average", "Optimizer._var_key"),
    "overridden and called: the weight average's warm-up momentum (training/weight_average.py)",
)
MOVING_AVERAGE_SLOTS = Seam(
    *TF_KERAS,
    "tf_keras.src.optimizers.optimizer",
    ("Optimizer._model_variables_moving_average", "Optimizer._index_dict", "Optimizer._distribution_strategy"),
    "where a built optimizer keeps the weight average (training/weight_average.py)",
    on_instance=True,
)
LEARNING_RATE = Seam(
    *TF_KERAS,
    "tf_keras.src.optimizers.optimizer",
    ("Optimizer._learning_rate",),
    "the optimizer's schedule object, to resize it (training/schedule.py)",
    on_instance=True,
)
EPOCH_LOGS_FROM_METRICS = Seam(
    *TF_KERAS,
    "tf_keras.src.engine.training",
    ("Model._validate_and_get_metrics_result",),
    "fit's log of an epoch: the model's metrics over every worker in place of the last step's "
    "values of the same names, so a step may return each worker's own (training/worker.py)",
)
MEAN_METRIC_STATE = Seam(
    *TF_KERAS,
    "tf_keras.src.metrics.base_metric",
    ("Reduce.total", "Reduce.count"),
    "a mean metric's running sum and count, read as this worker's own in a step (training/worker.py)",
    on_instance=True,
)
SUPPORTS_TF_LOGS = Seam(
    *TF_KERAS,
    "tf_keras.src.callbacks",
    ("Callback._supports_tf_logs",),
    "spares Keras converting the logs for a batch hook that reads none (training/callbacks.py)",
    on_instance=True,
)

SEAMS = tuple(value for value in list(globals().values()) if isinstance(value, Seam))


def borrow(seam: Seam):
    """The seam's object (a tuple of them for several names), or one line if it has moved."""
    found = tuple(_lookup(seam, name) for name in seam.names)
    return found[0] if len(found) == 1 else found


def replace(seam: Seam, value) -> None:
    """Sets the seam's one name, checked to exist first, to `value`."""
    [name] = seam.names
    _lookup(seam, name)
    owner, _, attribute = name.rpartition(".")
    setattr(_lookup(seam, owner) if owner else importlib.import_module(seam.module), attribute, value)


def _lookup(seam: Seam, name: str):
    try:
        found = importlib.import_module(seam.module)
        for part in name.split("."):
            found = getattr(found, part)
        return found
    except (ImportError, AttributeError):
        raise DigitsError(_moved(seam, name)) from None


def _moved(seam: Seam, name: str) -> str:
    installed = importlib.metadata.version(seam.package)
    return (
        f"{seam.module}.{name} is not in {seam.package} {installed} (it was read from "
        f"{seam.read_from}, and we rely on it for {seam.why}); install the version pyproject.toml pins"
    )

"""Distributed training and batch scoring for Kaggle's Digit Recognizer (MNIST)."""

import os

# Environment every process of ours needs before TensorFlow loads. The processes of an embedded
# Ray inherit it; those of a cluster we join get it through the runtime_env (runtime/ray_runtime.py),
# because they may import TensorFlow before any of our code.
#
# TF_USE_LEGACY_KERAS: TF 2.21's bundled Keras 3 fails under MultiWorkerMirroredStrategy with
# 2+ workers; legacy Keras (tf-keras) works. Read once, when TensorFlow is first imported.
#
# MALLOC_TOP_PAD_: under any tf.distribute strategy, glibc hands each training step's large
# temporary buffers back to the kernel and page-faults them in again on the next step, which
# slows CNN training badly; slack at the top of each malloc arena keeps them. glibc reads it
# when a process starts.
#
# PYTHONDONTWRITEBYTECODE, emptied: a `pip` runtime env copies the node's virtualenv without its
# bytecode caches, and where PYTHONDONTWRITEBYTECODE is set they are never rebuilt, so every
# process of every job would compile TensorFlow's Python again.
#
# RAY_DATA_LOG_LEVEL: Ray Data's coordinator actors would print five lines of INFO per dataset
# of every run ("Starting execution", the plan, "execution finished") into the user's console.
# PYTHONWARNINGS: nor would Ray's internal actors' deprecation warnings about Ray's own code,
# which no user of this tool can act on.
#
# RAY_worker_niceness: Ray starts its worker processes at niceness 15, below its own always-on
# processes (raylet, GCS, dashboard, the driver). Their frequent short wake-ups then preempt a
# training or scoring worker's TensorFlow threads at will, and each of its parallel ops waits
# for the thread that lost its core, and the worker's CPUs sit idle meanwhile (docs/design.md, "How
# training works", has the measurement). Ray's job supervisor runs at 0 for the same reason.
#
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller learns that the workers finished,
# that every rank reported (so a checkpoint registers) or that a worker died only when it next
# polls them, every 2 s by default (ending a run took about two polls); a poll is one cheap
# call per worker (a queue read), so every run ends, and every restart begins, seconds sooner
# (docs/design.md, "How training works"). The controller reads it from the driver's environment.
#
# RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` sends the entrypoint SIGTERM and SIGKILLs it 3 s later
# by default; a stopped `digits serve` needs longer to let its replicas answer what they hold and
# then stop Serve (cut off, Serve's controller and proxies stayed on the cluster), and a stopped
# training to stop its workers. Ray's job supervisor reads it from the job's runtime env.
RUNTIME_ENV_VARS = {
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MALLOC_TOP_PAD_": str(64 << 20),
    "PYTHONDONTWRITEBYTECODE": "",
    "RAY_DATA_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
    "RAY_worker_niceness": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_JOB_STOP_WAIT_TIME_S": "60",
}
for _name, _value in RUNTIME_ENV_VARS.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"

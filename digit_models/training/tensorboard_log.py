"""TensorBoard event files for every run, in RUN_DIR/tensorboard/, so that
`tensorboard --logdir runs/` shows every run's curves side by side.

Rank 0 writes them after each epoch's checkpoint. The file is not appended to, as Keras's
TensorBoard callback would: it is written whole from the run's history, the one that the
checkpoints carry, and replaces the previous file. A worker group restarted from an earlier
checkpoint, or a resumed run, has that checkpoint's history, so the epochs an abandoned attempt
logged after it disappear with the next write and no epoch appears twice. Each write has a new,
later name (as TensorFlow's own writers name theirs) because a running TensorBoard only moves on
to newer files; the old one is deleted once the new one is in place.

With --profile-steps every worker also traces those steps with TensorFlow's profiler, for
TensorBoard's Profile tab.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

from digit_models.runtime.tf_setup import keras, tf
from digit_models.storage.files import Folder
from digit_models.storage.run_dir import EPOCH_METRICS, RunDir
from digit_models.training.handoff import TrainingState


class TensorBoardEvents(keras.callbacks.Callback):
    """Rank 0's event file: the model graph and, per epoch, the EPOCH_METRICS of its history."""

    def __init__(self, run_dir: str, state: TrainingState):
        super().__init__()
        self.folder = Folder(RunDir(run_dir).child(RunDir.TENSORBOARD))
        self.state = state

    def on_train_begin(self, logs=None):
        self.graph = model_graph_events(self.model, time.time())
        self.write()  # at once: drops what an abandoned attempt logged after the checkpoint

    def on_epoch_end(self, epoch, logs=None):
        self.write()

    def write(self) -> None:
        events = [*self.graph, *scalar_events(self.state.history)]
        name = f"events.out.tfevents.{time.time_ns()}.digits"
        with tempfile.TemporaryDirectory(prefix="digits-tb-") as local:
            with tf.io.TFRecordWriter(str(Path(local, name))) as records:
                for event in events:
                    records.write(event.SerializeToString())
            self.folder.create()
            self.folder.write_bytes(name, Path(local, name).read_bytes())
        for earlier in self.folder.names():
            if earlier != name and "tfevents" in earlier:
                self.folder.delete(earlier)


def model_graph_events(model: keras.Model, wall_time: float) -> list:
    """TensorBoard's Graphs tab: the op graph of the model's prediction function, and the Keras
    configuration that it draws as the conceptual graph (as Keras's TensorBoard callback does)."""
    predict = tf.function(lambda pixels: model(pixels, training=False))
    graph = predict.get_concrete_function(tf.TensorSpec([None, *model.input_shape[1:]])).graph
    metadata = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="graph_keras_model", content=b"1")
    )
    keras_config = tf.compat.v1.Summary.Value(
        tag="keras", metadata=metadata, tensor=tf.make_tensor_proto(model.to_json())
    )
    return [
        tf.compat.v1.Event(wall_time=wall_time, file_version="brain.Event:2"),
        tf.compat.v1.Event(wall_time=wall_time, graph_def=graph.as_graph_def().SerializeToString()),
        tf.compat.v1.Event(wall_time=wall_time, step=0, summary=tf.compat.v1.Summary(value=[keras_config])),
    ]


def scalar_events(history: list[dict]) -> list:
    """One event per epoch (step = epoch number), at the time the epoch ended."""
    return [
        tf.compat.v1.Event(
            wall_time=entry.get("ended_unix", 0.0),
            step=entry["epoch"],
            summary=tf.compat.v1.Summary(
                value=[
                    tf.compat.v1.Summary.Value(tag=tag, simple_value=entry[tag])
                    for tag in EPOCH_METRICS
                    if tag in entry
                ]
            ),
        )
        for entry in history
    ]


class StepProfile(keras.callbacks.Callback):
    """--profile-steps FIRST:LAST on one worker: TensorFlow's profiler over those steps of the
    worker group's training (counted from its first step, across epochs; a call into TensorFlow
    runs several steps, so the trace starts and ends at the calls that hold FIRST and LAST),
    saved where TensorBoard's Profile tab finds it: tensorboard/plugins/profile/<when the
    command started>/<host>-rank<R>.xplane.pb. Beside it, <host>-rank<R>.threads.json: the
    steps traced, the seconds they took, and the CPU seconds each kind of the process's threads
    used meanwhile (TensorFlow's compute threads, the collectives' gRPC threads, Ray's), which
    the trace does not hold."""

    def __init__(
        self, run_dir: str, first: int, last: int, rank: int, command_started_unix: float, steps_per_call: int
    ):
        super().__init__()
        run = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(command_started_unix))
        self.folder = Folder(f"{RunDir(run_dir).child(RunDir.TENSORBOARD)}/plugins/profile/{run}")
        self.name = f"{socket.gethostname()}-rank{rank}"
        self.first, self.last, self.steps_per_call = first, last, steps_per_call
        self.before_epoch, self.step = 0, 0  # steps done before this epoch, and in all
        self.tracing, self.done = None, False
        self._supports_tf_logs = True  # seams.SUPPORTS_TF_LOGS: the batch hooks read no logs

    def on_train_batch_begin(self, batch, logs=None):
        # Keras numbers a call by its first step in the epoch (from 0); a call runs
        # steps_per_call steps, or the epoch's last ones.
        last_in_call = self.before_epoch + min(batch + self.steps_per_call, self.params["steps"])
        if not self.done and self.tracing is None and last_in_call >= self.first:
            self.tracing = tempfile.TemporaryDirectory(prefix="digits-profile-")
            self.started = (self.before_epoch + batch + 1, time.monotonic(), thread_cpu_seconds())
            tf.profiler.experimental.start(self.tracing.name)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step = self.before_epoch + batch + 1  # Keras gives a call's last step
        fit_ends = self.epoch == self.params["epochs"] - 1 and batch + 1 == self.params["steps"]
        # At the fit's last step at the latest: stopped from on_train_end, as the fit lets its
        # input go, TensorFlow's profiler once crashed a worker (a segfault collecting the trace)
        if self.tracing is not None and (self.step >= self.last or fit_ends):
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self.before_epoch = self.step

    def on_train_end(self, logs=None):
        if self.tracing is not None:  # stopped early (the target, the time budget)
            self._save()

    def _save(self) -> None:
        tf.profiler.experimental.stop()
        first, started, cpu_before = self.started
        cpu = thread_cpu_seconds()
        record = {
            "steps": [first, self.step],
            "seconds": time.monotonic() - started,
            "thread_cpu_seconds": {name: cpu[name] - cpu_before.get(name, 0.0) for name in sorted(cpu)},
        }
        [trace] = Path(self.tracing.name).glob("plugins/profile/*/*.xplane.pb")
        self.folder.create()
        self.folder.write_bytes(f"{self.name}.xplane.pb", trace.read_bytes())
        self.folder.write_json(f"{self.name}.threads.json", record)
        self.tracing.cleanup()
        self.tracing, self.done = None, True


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) this process's threads have used, summed by the thread's
    name with its digits dropped (TensorFlow and gRPC number the threads of a pool)."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        kind = "".join(c for c in name if not c.isdigit()).rstrip("-_/ ") or name
        used[kind] = used.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used

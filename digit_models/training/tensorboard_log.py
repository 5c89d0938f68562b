"""TensorBoard event files for every run, in RUN_DIR/tensorboard/, so that
`tensorboard --logdir runs/` shows every run's curves side by side.

Rank 0 writes them after each epoch's checkpoint. The file is not appended to, as Keras's
TensorBoard callback would: it is written whole from the run's history, the one that the
checkpoints carry, and replaces the previous file. A worker group restarted from an earlier
checkpoint, or a resumed run, has that checkpoint's history, so the epochs an abandoned attempt
logged after it disappear with the next write and no epoch appears twice. Each write has a new,
later name (as TensorFlow's own writers name theirs) because a running TensorBoard only moves on
to newer files; the old one is deleted once the new one is in place.
"""

from __future__ import annotations

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

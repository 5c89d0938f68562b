"""Where users look at a run: TensorBoard's event files and profiles and an MLflow store, read
back with TensorBoard's, TensorFlow's and MLflow's own readers, after a real 2-worker run that is
interrupted the way a killed driver leaves one and then resumed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from digit_models.config import TrainConfig
from digit_models.storage.run_dir import EPOCH_METRICS
from digit_models.training.driver import train
from tests.conftest import REPO, run_digits

EPOCHS = 3
PROFILED = (2, 5)  # --profile-steps: within the first call of 16 steps, which holds a whole epoch here


def _rewind_to_epoch(run_dir: Path, epoch: int) -> None:
    """Makes a finished run look like one whose driver died after rank 0 had logged the epochs
    after `epoch` but before their checkpoints registered: Ray Train's record of checkpoints
    ends at `epoch`, and there is no model.keras or run.json (TensorBoard's and MLflow's logs,
    written as the epochs ended, stay as they were)."""
    snapshot_file = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(snapshot_file.read_text())
    # Ray Train keeps the list sorted by the checkpoints' scores, not by epoch.
    kept = [r for r in snapshot["checkpoint_results"] if r["metrics"]["epoch"] <= epoch]
    for dropped in snapshot["checkpoint_results"]:
        if dropped["metrics"]["epoch"] > epoch:
            shutil.rmtree(run_dir / "checkpoints" / dropped["checkpoint_dir_name"])
    snapshot.update(
        checkpoint_results=kept,
        latest_checkpoint_result=max(kept, key=lambda r: r["metrics"]["epoch"]),
        checkpoint_report_indices=list(range(len(kept))),
        current_report_index=len(kept),
    )
    snapshot_file.write_text(json.dumps(snapshot))
    (run_dir / "run.json").unlink()
    (run_dir / "model.keras").unlink()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, kaggle_dir, ray_local, shared_ray_env) -> dict:
    """A dense net, 2 workers, 3 epochs on 600 real rows, run directory given as a file:// URI
    and logged to a file:// MLflow store; then rewound to epoch 2's checkpoint and resumed
    with `digits train --resume`."""
    base = tmp_path_factory.mktemp("logged")
    run_dir, store = base / "run", f"file://{base}/mlruns"
    first = train(
        TrainConfig(
            data=str(kaggle_dir),
            out=f"file://{run_dir}",
            model="dense",
            workers=2,
            epochs=EPOCHS,
            limit=600,
            cpus_per_worker=1,
            mlflow=store,
            profile_steps=[PROFILED[0], PROFILED[1]],
        )
    )
    abandoned = _scalars(run_dir / "tensorboard")
    _rewind_to_epoch(run_dir, EPOCHS - 1)
    resumed = run_digits("train", "--resume", f"file://{run_dir}", env=shared_ray_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {
        "dir": run_dir,
        "store": store,
        "first": first,
        "abandoned": abandoned,
        "run": json.loads((run_dir / "run.json").read_text()),
    }


def _event_file(folder: Path) -> Path:
    [events] = [path for path in folder.iterdir() if "tfevents" in path.name]
    return events


def _scalars(folder: Path) -> list[tuple[str, int, float]]:
    """Every scalar record of the event file, as written: (tag, step, value)."""
    import tensorflow as tf

    return [
        (value.tag, event.step, value.simple_value)
        for event in tf.compat.v1.train.summary_iterator(str(_event_file(folder)))
        for value in event.summary.value
        if value.HasField("simple_value")
    ]


def test_tensorboard_shows_each_epoch_once_with_the_committed_values(resumed_run):
    run = resumed_run["run"]
    [restart] = run["restarts"]
    assert restart["resumed_after_epoch"] == EPOCHS - 1 and restart["why"] == "digits train --resume"
    assert run["tensorboard"] == "tensorboard"
    records = _scalars(resumed_run["dir"] / "tensorboard")
    steps = Counter((tag, step) for tag, step, _ in records)
    assert steps == Counter({(tag, epoch): 1 for tag in EPOCH_METRICS for epoch in range(1, EPOCHS + 1)})
    for tag, step, value in records:
        assert value == pytest.approx(run["history"][step - 1][tag], rel=1e-6), (tag, step)
    # The abandoned attempt's last epoch was in the file; it was replaced, not added to.
    assert Counter(step for _, step, _ in resumed_run["abandoned"]) == Counter(
        {epoch: len(EPOCH_METRICS) for epoch in range(1, EPOCHS + 1)}
    )


def test_tensorboard_reads_the_curves_and_the_model_graph(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(resumed_run["dir"] / "tensorboard"))
    board.Reload()
    assert set(board.Tags()["scalars"]) == set(EPOCH_METRICS)
    assert [event.step for event in board.Scalars("val_accuracy")] == [1, 2, 3]
    losses = [event.value for event in board.Scalars("loss")]
    assert losses[-1] < losses[0]
    wall_times = [event.wall_time for event in board.Scalars("loss")]
    assert wall_times == sorted(wall_times) and wall_times[0] > 1.6e9  # when each epoch ended
    assert board.Scalars("learning_rate")[0].value == pytest.approx(1e-3)
    graph = board.Graph()  # the op graph of the model's prediction
    assert any(node.op == "MatMul" for node in graph.node)
    keras_config = board.Tensors("keras")[0].tensor_proto.string_val[0]  # the conceptual graph
    assert json.loads(keras_config)["config"]["name"] == "dense"


def test_each_command_of_the_run_left_a_profile_of_both_workers(resumed_run):
    """--profile-steps 2:5 (recorded, so the resume profiles too): per command, each worker's
    trace of the call into TensorFlow that holds those steps (epoch 1's 8 steps in the first,
    epoch 3's in the resume), with the model's ops and the all-reduce between the workers, and
    its threads' CPU time over the same steps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    assert resumed_run["run"]["config"]["profile_steps"] == list(PROFILED)
    commands = sorted((resumed_run["dir"] / "tensorboard" / "plugins" / "profile").iterdir())
    assert len(commands) == 2
    host = socket.gethostname()
    for folder in commands:
        assert sorted(path.name for path in folder.iterdir()) == [
            f"{host}-rank{rank}.{kind}" for rank in (0, 1) for kind in ("threads.json", "xplane.pb")
        ]
        for rank in (0, 1):
            record = json.loads((folder / f"{host}-rank{rank}.threads.json").read_text())
            assert record["steps"] == [1, 8] and record["seconds"] > 0
            assert sum(record["thread_cpu_seconds"].values()) > 0
            space = xplane_pb2.XSpace.FromString((folder / f"{host}-rank{rank}.xplane.pb").read_bytes())
            [cpu] = [plane for plane in space.planes if plane.name == "/host:CPU"]
            ops = {
                cpu.event_metadata[event.metadata_id].name.rpartition(":")[2]
                for line in cpu.lines
                for event in line.events
            }
            assert "CollectiveReduceV2" in ops and any("MatMul" in op for op in ops), sorted(ops)


def test_mlflow_has_the_params_each_epoch_once_and_the_artifacts(resumed_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's client only
    from mlflow import MlflowClient

    run = resumed_run["run"]
    tracking = MlflowClient(resumed_run["store"])
    [logged] = tracking.search_runs([tracking.get_experiment_by_name("digits").experiment_id])
    assert logged.info.run_id == run["mlflow_run_id"] == resumed_run["first"]["mlflow_run_id"]
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["model"] == "dense" and logged.data.params["workers"] == "2"
    assert logged.data.params["mlflow"] == resumed_run["store"]
    for key in EPOCH_METRICS:
        history = tracking.get_metric_history(logged.info.run_id, key)
        assert sorted(metric.step for metric in history) == [1, 2, 3], key
    # Epochs before the resumed checkpoint carry the committed values.
    first_losses = {m.step: m.value for m in tracking.get_metric_history(logged.info.run_id, "loss")}
    assert first_losses[1] == pytest.approx(run["history"][0]["loss"])
    artifacts = {artifact.path for artifact in tracking.list_artifacts(logged.info.run_id)}
    assert artifacts == {"run.json", "model.keras"}
    local = Path(tracking.download_artifacts(logged.info.run_id, "run.json", str(resumed_run["dir"].parent)))
    assert json.loads(local.read_text())["mlflow_run_id"] == logged.info.run_id


def test_mlflow_without_its_package_is_one_line_before_anything_starts(tmp_path, kaggle_dir):
    """A Python without mlflow (the import made to fail, as Python does for a None module)."""
    without_mlflow = (
        "import sys; sys.modules['mlflow'] = None; from digit_models.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            without_mlflow,
            "train",
            "--model",
            "dense",
            "--data",
            str(kaggle_dir),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--mlflow",
            f"file://{tmp_path}/mlruns",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "digits: error: --mlflow: the mlflow package is not installed; pip install 'digit-models[mlflow]'"
    )
    assert list(tmp_path.iterdir()) == []

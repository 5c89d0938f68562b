"""Runs on object storage: a real S3-protocol server on loopback (moto's server mode, tests/
conftest.py), reached the standard AWS way, with real Ray and TensorFlow. One small run is
trained there and scored, evaluated, reported on and exported from there; bad storage settings
are one line and exit 2 before anything starts."""

from __future__ import annotations

import json
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest

from digit_models.storage.files import Folder, open_binary, parent_and_name
from digit_models.runtime.ray_runtime import _env_vars_to_add
from tests.conftest import SLICE_TEST_ROWS, run_digits


def _query(server) -> str:
    """The server's address as settings in a URI's query, instead of AWS_ENDPOINT_URL."""
    return f"endpoint_override={server.endpoint.removeprefix('http://')}&scheme=http"


def _read_json(server, key: str) -> dict:
    with server.filesystem().open_input_stream(f"{server.bucket}/{key}") as stream:
        return json.loads(stream.read())


# ---------------------------------------------------------------------------- locations


def test_names_go_before_a_uris_query(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the query is what leads to the server
    query = _query(s3_server)
    folder = Folder(f"s3://{s3_server.bucket}/query-run/?{query}")
    assert folder.location == f"s3://{s3_server.bucket}/query-run?{query}"
    assert folder.child("run.json") == f"s3://{s3_server.bucket}/query-run/run.json?{query}"
    folder.write_text("run.json", "{}")
    assert f"{s3_server.bucket}/query-run/run.json" in s3_server.listing()
    with open_binary(folder.child("run.json")) as stream:
        assert stream.read() == b"{}"
    assert parent_and_name(folder.child("run.json")) == (folder.location, "run.json")


def test_a_question_mark_in_a_local_path_is_part_of_the_name(tmp_path):
    folder = Folder(str(tmp_path / "what?"))
    assert folder.child("run.json") == f"{tmp_path}/what?/run.json"
    assert parent_and_name(f"{tmp_path}/what?/run.json") == (f"{tmp_path}/what?", "run.json")
    assert parent_and_name("evaluation.json") == (".", "evaluation.json")
    assert parent_and_name("/evaluation.json") == ("/", "evaluation.json")


def test_the_drivers_s3_settings_go_into_a_joined_clusters_runtime_env(monkeypatch):
    """(That the processes then reach the store: `s3_run` below.)"""
    settings = {
        "AWS_ENDPOINT_URL": "http://storage.internal:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    forwarded = _env_vars_to_add()
    assert {name: forwarded[name] for name in settings} == settings
    assert "AWS_SESSION_TOKEN" not in forwarded  # only what the driver has
    # Inside a `ray job submit` job, Ray refuses a variable its runtime env already sets.
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"AWS_REGION": "eu-west-1"}}})
    )
    assert "AWS_REGION" not in _env_vars_to_add()


# ---------------------------------------------------------------------------- a run on the server


@pytest.fixture(scope="module")
def s3_run(s3_server, s3_kaggle, shared_ray_env) -> str:
    """The seed's dense net, 1 worker, 2 epochs on 600 rows, read from and written to the
    server by `digits train` joined to the session's Ray, whose processes learn the server's
    settings only from the command (the session's Ray was started without them)."""
    run = f"s3://{s3_server.bucket}/runs/dense"
    done = run_digits(
        "train",
        "--model",
        "dense",
        "--workers",
        "1",
        "--epochs",
        "2",
        "--limit",
        "600",
        "--data",
        s3_kaggle,
        "--out",
        run,
        env={**shared_ray_env, **s3_server.env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def s3_scored(s3_server, s3_kaggle, s3_run, shared_ray_env) -> str:
    scored = f"s3://{s3_server.bucket}/scored"
    done = run_digits(
        "predict",
        "--run",
        s3_run,
        "--input",
        f"{s3_kaggle}/test.csv",
        "--out",
        scored,
        env={**shared_ray_env, **s3_server.env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return scored


def test_training_writes_the_whole_run_to_the_server(s3_server, s3_run):
    written = s3_server.listing()
    run_key = s3_run.removeprefix("s3://")
    for name in ("started.json", "model.keras", "run.json"):
        assert f"{run_key}/{name}" in written
    assert any(key.startswith(f"{run_key}/checkpoints/") for key in written)
    assert any(key.startswith(f"{run_key}/tensorboard/") for key in written)
    run = _read_json(s3_server, "runs/dense/run.json")
    assert run["epochs_run"] == 2 and len(run["history"]) == 2
    assert run["history"][-1]["val_accuracy"] > 0.5  # 600 real digits; chance is 0.1


def test_scoring_reads_the_run_and_input_from_the_server_and_writes_there(s3_server, s3_run, s3_scored):
    fs = s3_server.filesystem()
    scored_key = s3_scored.removeprefix("s3://")
    table = pq.read_table(f"{scored_key}/predictions", filesystem=fs)
    assert sorted(table.column("ImageId").to_pylist()) == list(range(1, SLICE_TEST_ROWS + 1))
    probabilities = np.stack([table.column(f"prob_{digit}").to_numpy() for digit in range(10)], axis=1)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    with fs.open_input_stream(f"{scored_key}/submission.csv") as stream:
        lines = stream.read().decode().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == SLICE_TEST_ROWS + 1
    record = _read_json(s3_server, "scored/predict.json")
    assert record["images"] == SLICE_TEST_ROWS and record["runs"] == [s3_run]


def test_evaluate_reads_predictions_and_labels_from_the_server(s3_server, s3_kaggle, s3_scored):
    target = f"s3://{s3_server.bucket}/evaluations/plain.json"
    done = run_digits(
        "evaluate",
        "--predictions",
        s3_scored,
        "--labels",
        f"{s3_kaggle}/test_labels.csv",
        "--json",
        target,
        env=s3_server.env,
    )
    assert done.returncode == 0, done.stderr
    evaluation = _read_json(s3_server, "evaluations/plain.json")
    assert evaluation["images"] == SLICE_TEST_ROWS and evaluation["accuracy"] > 0.5
    assert done.stdout.startswith(f"accuracy {evaluation['accuracy']:.4f}")


def test_a_uri_with_the_endpoint_in_its_query_works_end_to_end(s3_server, s3_kaggle, s3_scored):
    """No AWS_ENDPOINT_URL: the query leads every read and the write to the server, and
    evaluation.json lands in the predictions folder, not in an object named after the query."""
    query = _query(s3_server)
    settings = {name: value for name, value in s3_server.env.items() if name != "AWS_ENDPOINT_URL"}
    done = run_digits(
        "evaluate",
        "--predictions",
        f"{s3_scored}?{query}",
        "--labels",
        f"{s3_kaggle}/test_labels.csv?{query}",
        env=settings,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"written to {s3_scored}/evaluation.json?{query}"
    by_query = _read_json(s3_server, "scored/evaluation.json")
    assert by_query["images"] == SLICE_TEST_ROWS and by_query["accuracy"] > 0.5


def test_scoring_and_evaluating_with_the_endpoint_in_the_querys_of_input_and_output(
    s3_server, s3_kaggle, s3_run, shared_ray_env
):
    """No AWS_ENDPOINT_URL: the input's query leads its listing and reading to the server,
    the output's query the Parquet written by Ray Data's tasks, and evaluating the
    submission.csv writes evaluation.json beside it; no object is named after the query."""
    query = _query(s3_server)
    settings = {name: value for name, value in s3_server.env.items() if name != "AWS_ENDPOINT_URL"}
    scored = f"s3://{s3_server.bucket}/scored-by-query"
    done = run_digits(
        "predict",
        "--run",
        f"{s3_run}?{query}",
        "--input",
        f"{s3_kaggle}/test.csv?{query}",
        "--out",
        f"{scored}?{query}",
        env={**shared_ray_env, **settings},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].endswith(f"submission: {scored}/submission.csv?{query}")
    done = run_digits(
        "evaluate",
        "--predictions",
        f"{scored}/submission.csv?{query}",
        "--labels",
        f"{s3_kaggle}/test_labels.csv?{query}",
        env=settings,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"written to {scored}/evaluation.json?{query}"

    written = [key for key in s3_server.listing() if key.startswith(f"{s3_server.bucket}/scored-by-query")]
    assert not any("?" in key or "endpoint_override" in key for key in written), written
    table = pq.read_table(f"{s3_server.bucket}/scored-by-query/predictions", filesystem=s3_server.filesystem())
    assert sorted(table.column("ImageId").to_pylist()) == list(range(1, SLICE_TEST_ROWS + 1))
    record = _read_json(s3_server, "scored-by-query/predict.json")
    assert record["images"] == SLICE_TEST_ROWS
    assert [entry["file"] for entry in record["input_files"]] == [f"{s3_kaggle}/test.csv?{query}"]
    evaluation = _read_json(s3_server, "scored-by-query/evaluation.json")
    assert evaluation["images"] == SLICE_TEST_ROWS and evaluation["accuracy"] > 0.5


def test_a_report_on_a_run_and_predictions_on_the_server_is_written_there(s3_server, s3_kaggle, s3_run, s3_scored):
    report = f"s3://{s3_server.bucket}/report"
    done = run_digits(
        "report",
        s3_run,
        "--predictions",
        s3_scored,
        "--labels",
        f"{s3_kaggle}/test_labels.csv",
        "--out",
        report,
        env=s3_server.env,
    )
    assert done.returncode == 0, done.stderr
    written = {
        key.rpartition("/")[2]: size
        for key, size in s3_server.listing().items()
        if key.startswith(f"{s3_server.bucket}/report/")
    }
    assert set(written) == {
        "training_curves.png",
        "confusion_matrix.png",
        "per_class_accuracy.png",
        "mistakes.png",
        "index.html",
    }
    with s3_server.filesystem().open_input_stream(f"{s3_server.bucket}/report/index.html") as stream:
        page = stream.read().decode()
    assert page.count("data:image/png;base64,") == 4 and "run dense" in page


def test_export_reads_the_run_from_the_server(tmp_path, s3_server, s3_run, s3_scored, kaggle_dir):
    """The exported model predicts what scoring the run on the server predicted."""
    done = run_digits("export", "--run", s3_run, "--out", str(tmp_path / "served"), env=s3_server.env)
    assert done.returncode == 0, done.stderr
    from digit_models.storage.kaggle_csv import read_test_csv
    from digit_models.runtime.tf_setup import tf

    images = read_test_csv(str(kaggle_dir / "test.csv"), limit=64).images.astype(np.float32)
    served = tf.saved_model.load(str(tmp_path / "served" / "1")).signatures["serving_default"]
    exported = served(pixels=tf.constant(images))["probabilities"].numpy()
    scored = (
        pq.read_table(f"{s3_scored.removeprefix('s3://')}/predictions", filesystem=s3_server.filesystem())
        .sort_by("ImageId")
        .slice(0, 64)
    )
    assert np.allclose(
        exported, np.stack([scored.column(f"prob_{digit}").to_numpy() for digit in range(10)], axis=1), atol=1e-5
    )


# ---------------------------------------------------------------------------- bad settings


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe closes


def _bad_settings(case: str, server) -> tuple[dict, str, str]:
    """The environment, the bucket the command names and the problem expected."""
    if case == "no such bucket":
        return server.env, "no-such-bucket", "no such bucket"
    if case == "wrong keys":
        return (
            {**server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
            server.bucket,
            "access denied (check the keys and their permissions)",
        )
    endpoint = f"http://127.0.0.1:{_closed_port()}"  # endpoint down: the connection is refused
    return ({**server.env, "AWS_ENDPOINT_URL": endpoint}, server.bucket, f"cannot reach the endpoint {endpoint}")


COMMANDS = {  # each command's arguments ({b}: the bucket's URI), and the location it checks first
    "train": (["train", "--model", "dense", "--data", "{b}/kaggle", "--out", "{b}/runs/refused"], "{b}/runs/refused"),
    "predict": (
        ["predict", "--run", "{b}/runs/dense", "--input", "{b}/kaggle/test.csv", "--out", "{b}/refused"],
        "{b}/refused",
    ),
    "evaluate": (["evaluate", "--predictions", "{b}/scored", "--labels", "{b}/kaggle/test_labels.csv"], "{b}/scored"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["no such bucket", "wrong keys", "endpoint down"])
def test_bad_storage_settings_are_one_line_and_exit_2_with_nothing_written(s3_server, s3_kaggle, case, command):
    """Checked before Ray starts: the one line is the check's, which runs first."""
    env, bucket, problem = _bad_settings(case, s3_server)
    arguments, checked_first = COMMANDS[command]
    before = s3_server.listing()
    done = run_digits(*(argument.format(b=f"s3://{bucket}") for argument in arguments), env=env)
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        [f"digits: error: {checked_first.format(b=f's3://{bucket}')}: {problem}"],
    )
    assert s3_server.listing() == before

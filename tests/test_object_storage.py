"""Runs on object storage: a real S3-protocol server on loopback (moto's server mode, tests/
conftest.py), reached the standard AWS way, with real Ray and TensorFlow. One small run is
trained there and scored, evaluated, reported on and exported from there; bad storage settings
are one line and exit 2 before anything starts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from digit_models.files import Folder, open_binary, parent_and_name
from digit_models.ray_runtime import _env_vars_to_add
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


def test_the_drivers_s3_settings_reach_the_processes_of_a_cluster_it_joins(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    forwarded = _env_vars_to_add()
    assert {name: forwarded[name] for name in s3_server.env} == s3_server.env
    assert "AWS_SESSION_TOKEN" not in forwarded  # only what the driver has
    # Inside a `ray job submit` job, Ray refuses a variable its runtime env already sets.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"AWS_REGION": "eu-west-1"}}}))
    assert "AWS_REGION" not in _env_vars_to_add()

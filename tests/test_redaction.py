"""Credentials in URIs are used and never written down: a run trained, scored and evaluated on
the S3 server (tests/conftest.py) with its keys only in the URIs' userinfo, logged to MLflow,
and commands refused for credentials in the query. The secret is in no file of the run or the
scored folder, nowhere in MLflow's store and in no line of the console."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from digit_models.storage.files import without_credentials
from tests.conftest import SLICE_TEST_ROWS, run_digits


@pytest.mark.parametrize(
    "given, kept",
    [
        (
            "s3://AKIA:se%2Fcret@digits/run?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://digits/run?endpoint_override=127.0.0.1:9000&scheme=http",
        ),
        # An unescaped "/" in the secret, which pyarrow refuses with a message that quotes it.
        (
            "error: s3://AKIA:se/cr+et@digits/run: cannot open: Cannot parse URI: 's3://AKIA:se/cr+et@digits/run'",
            "error: s3://digits/run: cannot open: Cannot parse URI: 's3://digits/run'",
        ),
        (
            "s3://digits/run?scheme=http&secret_key=SECRET&session_token=TOKEN: cannot open",
            "s3://digits/run?scheme=http: cannot open",
        ),
        ('{"data": "gs://bucket/train.csv?access_token=TOKEN"}', '{"data": "gs://bucket/train.csv"}'),
        ("abfs://account:KEY@container/p", "abfs://container/p"),
        ("http://user:password@mlflow:5000", "http://mlflow:5000"),
        # Not credentials: Azure's container, an HDFS user, a SAS token's other fields, an "@" or
        # "?" in a path.
        (
            "abfs://container@account.dfs.core.windows.net/p?sv=2024&sig=SIGNATURE",
            "abfs://container@account.dfs.core.windows.net/p?sv=2024",
        ),
        ("hdfs://user@namenode:8020/runs", "hdfs://user@namenode:8020/runs"),
        ("s3://bucket/users/me@example.com/run", "s3://bucket/users/me@example.com/run"),
        ("/tmp/what?secret_key=x", "/tmp/what?secret_key=x"),
    ],
)
def test_a_uri_loses_its_credentials_and_nothing_else(given, kept):
    assert without_credentials(given) == kept


class KeysInUris:
    """Locations on the S3 server with its keys in their userinfo and its endpoint in their
    query, for commands run without the keys or the endpoint in their environment."""

    def __init__(self, server):
        self.bucket, self.key, self.secret = (
            server.bucket,
            server.env["AWS_ACCESS_KEY_ID"],
            server.env["AWS_SECRET_ACCESS_KEY"],
        )
        self.endpoint = f"endpoint_override={server.endpoint.removeprefix('http://')}&scheme=http"
        self.env = {
            name: value
            for name, value in server.env.items()
            if name not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
        }

    def uri(self, path: str, userinfo: str | None = None) -> str:
        if userinfo is None:
            userinfo = f"{quote(self.key, safe='')}:{quote(self.secret, safe='')}@"
        return f"s3://{userinfo}{self.bucket}/{path}?{self.endpoint}"

    def recorded(self, path: str) -> str:
        """How a location is written down: without the keys."""
        return self.uri(path, userinfo="")

    def secrets(self) -> set[str]:
        """The keys as they may appear: as given, escaped, and the halves of the secret that
        a test puts on either side of an unescaped "/"."""
        halves = (self.secret[:20], self.secret[20:])
        return {self.key, self.secret, quote(self.secret, safe=""), *halves}


@pytest.fixture(scope="module")
def keys_in_uris(s3_server, s3_kaggle) -> KeysInUris:
    return KeysInUris(s3_server)


@pytest.fixture(scope="module")
def commands_with_keys(tmp_path_factory, keys_in_uris, shared_ray_env) -> dict:
    """The seed's dense net trained for 1 epoch on 600 rows, logged to a file:// MLflow store,
    scored and evaluated, every location with the keys in it: each command's console (stdout
    and stderr), and the MLflow store."""
    s3, mlruns = keys_in_uris, tmp_path_factory.mktemp("mlflow") / "mlruns"
    commands = {
        "train": [
            "train",
            "--model",
            "dense",
            "--workers",
            "1",
            "--epochs",
            "1",
            "--limit",
            "600",
            "--data",
            s3.uri("kaggle"),
            "--out",
            s3.uri("runs/keys-in-uri"),
            "--mlflow",
            mlruns.as_uri(),
        ],
        "predict": [
            "predict",
            "--run",
            s3.uri("runs/keys-in-uri"),
            "--input",
            s3.uri("kaggle/test.csv"),
            "--out",
            s3.uri("scored-keys-in-uri"),
        ],
        "evaluate": [
            "evaluate",
            "--predictions",
            s3.uri("scored-keys-in-uri"),
            "--labels",
            s3.uri("kaggle/test_labels.csv"),
        ],
    }
    console = {}
    for name, arguments in commands.items():
        done = run_digits(*arguments, env={**s3.env, **shared_ray_env})
        assert done.returncode == 0, (name, done.stderr[-3000:])
        console[name] = done.stdout + done.stderr
    return {"console": console, "mlruns": mlruns}


def test_the_keys_are_in_no_file_of_the_run_the_scores_or_mlflow_nor_on_the_console(
    s3_server, keys_in_uris, commands_with_keys
):
    s3 = keys_in_uris
    console = list(commands_with_keys["console"].values())
    # Credentials in the query, which pyarrow refuses, and a secret with an unescaped "/",
    # which it cannot parse: each refused in one line naming the location without them.
    refused = {
        f"s3://{s3.bucket}/scored-keys-in-uri?{s3.endpoint}&access_key={s3.key}&secret_key="
        f"{s3.secret}&session_token={s3.secret}": "Unexpected query parameter",
        s3.uri("scored-keys-in-uri", f"{s3.key}:{s3.secret[:20]}/{s3.secret[20:]}@"): "Cannot parse URI",
    }
    for location, problem in refused.items():
        done = run_digits(
            "evaluate", "--predictions", location, "--labels", s3.uri("kaggle/test_labels.csv"), env=s3.env
        )
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert f"error: {s3.recorded('scored-keys-in-uri')}: cannot open: {problem}" in done.stderr
        console.append(done.stdout + done.stderr)

    fs = s3_server.filesystem()
    written = {
        path: fs.open_input_stream(path).read()
        for path in s3_server.listing()
        if path.startswith((f"{s3.bucket}/runs/keys-in-uri/", f"{s3.bucket}/scored-keys-in-uri/"))
    }
    written.update({str(path): path.read_bytes() for path in commands_with_keys["mlruns"].rglob("*") if path.is_file()})
    for part in (
        "/started.json",
        "/run.json",
        "/attempts/",
        "/checkpoints/",
        "/tensorboard/",
        "/predict.json",
        "/evaluation.json",
        "/params/data",
        "/artifacts/run.json",
    ):
        assert any(part in path for path in written), part
    secrets = s3.secrets()
    assert not [path for path, content in written.items() if any(text.encode() in content for text in secrets)]
    assert not [line for line in "".join(console).splitlines() if any(text in line for text in secrets)]


def test_the_records_name_the_locations_without_the_keys(s3_server, keys_in_uris, commands_with_keys):
    s3, fs = keys_in_uris, s3_server.filesystem()

    def read_json(key: str) -> dict:
        with fs.open_input_stream(f"{s3.bucket}/{key}") as stream:
            return json.loads(stream.read())

    run = read_json("runs/keys-in-uri/run.json")
    assert (run["config"]["data"], run["config"]["out"], run["data"]["train_csv"]) == (
        s3.recorded("kaggle"),
        s3.recorded("runs/keys-in-uri"),
        s3.recorded("kaggle/train.csv"),
    )
    scored = read_json("scored-keys-in-uri/predict.json")
    assert scored["runs"] == [s3.recorded("runs/keys-in-uri")] and scored["images"] == SLICE_TEST_ROWS
    assert read_json("scored-keys-in-uri/evaluation.json")["predictions"] == s3.recorded("scored-keys-in-uri")
    params = {path.name: path.read_text() for path in commands_with_keys["mlruns"].glob("*/*/params/*")}
    assert (params["data"], params["out"]) == (s3.recorded("kaggle"), s3.recorded("runs/keys-in-uri"))
    assert commands_with_keys["console"]["evaluate"].splitlines()[-1] == (
        f"written to {s3.recorded('scored-keys-in-uri/evaluation.json')}"
    )

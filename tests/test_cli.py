"""The command line as a new user meets it, through the real `digits` process: one way to name
a run in every command, --debug on either side of the command, usage errors in one line, a
closed stdout, and `digits runs`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from digit_models.cli import _restarts_spent, build_parser
from tests.conftest import REPO, run_digits


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("digits: error: "), line
    return line


def test_report_takes_the_run_as_predict_and_export_do(tmp_path, dense_run):
    done = run_digits("report", "--run", str(dense_run), "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "index.html").exists()


def test_report_still_takes_the_run_first_but_not_two_runs(tmp_path, dense_run):
    done = run_digits("report", str(dense_run), "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr  # the scripts written before --run
    assert (tmp_path / "report" / "index.html").exists()
    line = _one_error_line(
        run_digits("report", str(dense_run), "--run", str(dense_run), "--out", str(tmp_path / "other"))
    )
    assert "two runs given" in line
    assert not (tmp_path / "other").exists()
    line = _one_error_line(run_digits("report", "--out", str(tmp_path / "other")))
    assert line == "digits: error: the following arguments are required: --run (see `digits report --help`)"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_the_command(tmp_path, where):
    missing = str(tmp_path / "absent.csv")
    command = ["evaluate", "--predictions", missing, "--labels", missing]
    done = run_digits(*(["--debug", *command] if where == "before" else [*command, "--debug"]))
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().endswith(f"digits: error: {missing}: no such file")


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["predict", "--run", "runs/a"],
            "the following arguments are required: --input, --out (see `digits predict --help`)",
        ),
        (["train", "--epochs", "many"], "argument --epochs: invalid int value: 'many' (see `digits train --help`)"),
        (["report", "--run", "runs/a", "--out", "r", "--colour"], "unrecognized arguments: --colour"),
        (["nosuch"], "argument COMMAND: invalid choice: 'nosuch'"),
    ],
    ids=["missing", "not-a-number", "unknown-option", "unknown-command"],
)
def test_a_usage_error_is_one_line(args, message):
    assert message in _one_error_line(run_digits(*args))


def _with_stdout_closed(*args: str) -> subprocess.CompletedProcess:
    """The command writing into a pipe whose reader has gone, as under `| head` once head has
    read its lines: every write to stdout fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "digit_models.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_the_output_quietly(tmp_path, dense_scored, kaggle_dir):
    written = tmp_path / "evaluation.json"
    done = _with_stdout_closed(
        "evaluate",
        "--predictions",
        str(dense_scored),
        "--labels",
        str(kaggle_dir / "test_labels.csv"),
        "--json",
        str(written),
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(written.read_text())["images"] == 1_500  # the work is done all the same


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_train_help_says_what_the_readme_says_of_the_time_budget():
    shown = _normalized(run_digits("train", "--help").stdout)
    readme = _normalized((REPO / "README.md").read_text())
    promise = "after each epoch of the plan's first half (the first three at least)"
    assert promise in shown and promise in readme
    assert "after the first epoch" not in shown
    assert not re.search(r"\d+ ?min\b", shown), "recipe times belong in the README's tables"


# ---------------------------------------------------------------------------- digits runs


def _runs_folder(tmp_path: Path, dense_run: Path) -> Path:
    """A finished run, an unfinished one (started, checkpointed, no run.json), a failed one
    (the same, with Ray Train's last record a worker failure), one whose run.json is cut short,
    a folder that is no run and a file, all from the session's real run."""
    runs = tmp_path / "runs"
    shutil.copytree(dense_run, runs / "a-finished")
    for name, records in (("b-unfinished", ["start"]), ("c-failed", ["start", "failure"])):
        run = runs / name
        run.mkdir()
        shutil.copy(dense_run / "started.json", run)
        shutil.copytree(dense_run / "checkpoints", run / "checkpoints")
        (run / "attempts").mkdir()
        for at, kind in enumerate(records):  # attempts.py's names: milliseconds, then the kind
            (run / "attempts" / f"{1_700_000_000_000 + at:013d}-{kind}.json").write_text(
                json.dumps({"errors": {"0": "RuntimeError: boom"}} if kind == "failure" else {})
            )
    (runs / "d-damaged").mkdir()
    (runs / "d-damaged" / "run.json").write_text('{"model": ')
    (runs / "notes").mkdir()
    (runs / "readme.txt").write_text("not a run")
    return runs


def test_runs_lists_every_run_with_its_best_epoch_and_state(tmp_path, dense_run):
    runs = _runs_folder(tmp_path, dense_run)
    history = json.loads((dense_run / "run.json").read_text())["history"]
    best = max(history, key=lambda entry: entry["val_accuracy"])

    done = run_digits("runs", str(runs))
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split() == ["run", "model", "epochs", "best", "val_accuracy", "state"]
    expected = f"dense 3 of 3 {best['val_accuracy']:.4f} (epoch {best['epoch']})"
    assert [line.split(maxsplit=1)[0] for line in lines] == ["a-finished", "b-unfinished", "c-failed", "d-damaged"]
    for line, state in zip(lines, ["finished", "unfinished", "failed"]):
        assert _normalized(line).endswith(f"{expected} {state}"), line
    assert _normalized(lines[3]) == "d-damaged ? 0 of ? - unreadable"

    listed = json.loads(run_digits("runs", "--json", f"file://{runs}").stdout)
    assert [(entry["run"], entry["state"], entry["best_val_accuracy"], entry["best_epoch"]) for entry in listed] == [
        (name, state, best["val_accuracy"], best["epoch"])
        for name, state in [("a-finished", "finished"), ("b-unfinished", "unfinished"), ("c-failed", "failed")]
    ] + [("d-damaged", "unreadable", None, None)]
    assert listed[3]["problem"].startswith(f"file://{runs}/d-damaged/run.json: unreadable")
    assert listed[0]["location"] == f"file://{runs}/a-finished"


def test_runs_lists_the_current_directory_by_default_and_refuses_a_missing_one(tmp_path, dense_run):
    runs = _runs_folder(tmp_path, dense_run)
    done = subprocess.run(
        [sys.executable, "-m", "digit_models.cli", "runs", "--json"],
        cwd=runs,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert [entry["location"] for entry in json.loads(done.stdout)] == [
        "./a-finished",
        "./b-unfinished",
        "./c-failed",
        "./d-damaged",
    ]
    assert _one_error_line(run_digits("runs", str(tmp_path / "absent"))).endswith("absent: no such folder")


def test_a_spent_preemption_budget_is_named_as_such():
    """Ray Train's own errors at the end of a run: a preemption past --max-preemptions and a
    worker's failure past --max-failures each name their option; another error is not ours."""
    from ray.exceptions import RayActorError
    from ray.train import PreemptionError, WorkerGroupError
    from ray.train.v2.api.preemption import PreemptionInfo

    args = build_parser().parse_args(["train", "--data", "d", "--out", "runs/r"])
    preempted = PreemptionError(PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n1": [1]}))
    assert _restarts_spent(RuntimeError("the run failed"), args) is None
    said = _restarts_spent(preempted, args)
    assert said.startswith("the workers' nodes were preempted once more than --max-preemptions allows (")
    assert said.endswith("); `digits train --resume runs/r` goes on from the last checkpoint")
    failed = WorkerGroupError("rank 0 died", {0: RayActorError()})
    said = _restarts_spent(failed, args)
    assert said.startswith("the workers failed once more than --max-failures allows (RayActorError: ")

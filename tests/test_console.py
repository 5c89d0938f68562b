"""What the user's console shows: one line for bad input, decided before any heavy library
loads; our own lines from a real run, without TensorFlow's or Ray's start-up chatter; and
progress as one live line on a terminal, sparse lines in a log."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, ray_processes
from digit_models.runtime.console import PROGRESS, SAY, LiveLine

# Runs the real entry point, then lists the modules it had imported when it exited.
PROBE = (
    "import atexit, json, os, sys\n"
    "atexit.register(lambda: open(os.environ['IMPORTED'], 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from digit_models.cli import entry_point\n"
    "sys.argv[0] = 'digits'\n"
    "entry_point()\n"
)
HEAVY = ("tensorflow", "ray", "matplotlib", "pandas")

# What TensorFlow's CUDA build and Ray print from every process, and Ray's prefix on
# forwarded worker lines, none of which a user should have to read past.
CHATTER = re.compile(
    r"cuInit|cuda drivers|absl::InitializeLog|cudart_stub|oneDNN custom operations"
    r"|computation_placer|Traceback|\(\w+ pid=\d+|\x1b\[|object store and max_restarts"
)


def _mistyped(kaggle_dir, dense_run, out):
    test_csv, labels = str(kaggle_dir / "test.csv"), str(kaggle_dir / "test_labels.csv")
    return {
        "predict, no such run": (
            ["predict", "--run", "/nonexistent/run", "--input", test_csv, "--out", out],
            "no such run directory",
        ),
        "predict, no such input": (
            ["predict", "--run", str(dense_run), "--input", "/nonexistent/test.csv", "--out", out],
            "no such file",
        ),
        "train, no such data": (["train", "--data", "/nonexistent/train.csv", "--out", out], "no such file"),
        "train, unknown model": (
            ["train", "--model", "nosuch", "--data", str(kaggle_dir), "--out", out],
            "--model nosuch: choose one of",
        ),
        "evaluate, no such predictions": (
            ["evaluate", "--predictions", "/nonexistent/out", "--labels", labels],
            "no such file",
        ),
        "report, no such run": (["report", "--run", "/nonexistent/run", "--out", out], "no such run directory"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "predict, no such run",
        "predict, no such input",
        "train, no such data",
        "train, unknown model",
        "evaluate, no such predictions",
        "report, no such run",
    ],
)
def test_mistyped_input_is_one_line_before_any_heavy_import(tmp_path, kaggle_dir, dense_run, case):
    out = tmp_path / "out"
    args, message = _mistyped(kaggle_dir, dense_run, str(out))[case]
    imported = tmp_path / "imported.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "IMPORTED": str(imported)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("digits: error: ") and message in line, line
    loaded = {name.split(".")[0] for name in json.loads(imported.read_text())}
    assert not loaded & set(HEAVY), f"imported before the error: {sorted(loaded & set(HEAVY))}"
    assert not out.exists()


@pytest.mark.timeout(400)
def test_two_real_commands_at_once_print_our_lines_and_no_chatter(tmp_path, kaggle_dir, dense_run, ray_tmpdir):
    """A 2-worker training and a scoring run started together, as a user would, each starting
    its own embedded Ray beside the other (and beside the test session's): both finish, each
    printing only its own lines, and neither driver loads TensorFlow (the workers and scoring
    actors do). (Ray Train's placement-group cleaner used to die with a traceback, "Found
    multiple active Ray instances", beside a second Ray.)"""
    run_dir, out = tmp_path / "run", tmp_path / "scored"
    digits, env = [sys.executable, "-c", PROBE], {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    imported = {"train": tmp_path / "train-imported.json", "predict": tmp_path / "predict-imported.json"}
    training = subprocess.Popen(
        [
            *digits,
            "train",
            "--model",
            "dense",
            "--data",
            str(kaggle_dir),
            "--workers",
            "2",
            "--epochs",
            "3",
            "--out",
            str(run_dir),
        ],
        cwd=REPO,
        env={**env, "IMPORTED": str(imported["train"])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    scoring = subprocess.Popen(
        [*digits, "predict", "--run", str(dense_run), "--input", str(kaggle_dir / "test.csv"), "--out", str(out)],
        cwd=REPO,
        env={**env, "IMPORTED": str(imported["predict"])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    trained, scored = (child.communicate(timeout=350)[0].splitlines() for child in (training, scoring))
    assert training.returncode == 0 and scoring.returncode == 0, trained + scored
    assert [line[:10] for line in trained] == ["epoch 1/3 ", "epoch 2/3 ", "epoch 3/3 ", "epochs exh"], trained
    images_per_s = json.loads((out / "predict.json").read_text())["images_per_s"]
    assert scored == [f"scored 1,500 images ({images_per_s:,.0f} images/s); submission: {out}/submission.csv"]
    for line in trained + scored:
        assert not CHATTER.search(line), line
    for command, modules in imported.items():
        modules = set(json.loads(modules.read_text()))
        assert "ray.train" in modules or "ray.data" in modules, command  # the probe saw the command run
        assert modules.isdisjoint({"tensorflow", "tf_keras", "keras"}), command
    assert not ray_processes(ray_tmpdir)


# ---------------------------------------------------------------------------- the live line


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_crash_inside_the_filtered_console_still_reports_every_threads_stack():
    crash = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes\n"
            "from digit_models.runtime.console import stderr_filtered\n"
            "with stderr_filtered():\n"
            "    ctypes.string_at(0)\n",
        ],  # a real SIGSEGV
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crash.returncode == -11
    assert "Fatal Python error: Segmentation fault" in crash.stderr
    assert 'File "<string>", line 4' in crash.stderr  # where it crashed


def test_on_a_terminal_progress_is_one_line_redrawn_in_place():
    stream = io.StringIO()
    live = LiveLine(stream, terminal=True)
    live.progress({"text": "epoch 1/3: 10%"})
    live.progress({"text": "epoch 1/3: 20%"})
    live.line("epoch 1/3  loss 0.1")
    live.progress({"text": "epoch 2/3: 5%"})
    live.clear()
    assert stream.getvalue() == (
        "\repoch 1/3: 10%\x1b[K\repoch 1/3: 20%\x1b[K\r\x1b[Kepoch 1/3  loss 0.1\n\repoch 2/3: 5%\x1b[K\r\x1b[K"
    )


def test_in_a_log_progress_appears_once_it_has_lasted_and_then_every_30_s_unless_ending():
    stream, clock = io.StringIO(), Clock()
    live = LiveLine(stream, terminal=False, clock=clock)
    live.formatter = lambda message: {"text": f"scoring: {message['images']:,} images"}
    for second in range(0, 100, 5):
        clock.now = second
        live.progress({"images": second * 100})
    clock.now = 100
    live.line("epoch 1/2  loss 0.1")  # the next progress line counts 30 s from here
    for second, left_s in ((125, 40.0), (131, 5.0), (132, 40.0)):
        clock.now = second
        live.progress({"text": f"epoch 2/2: at {second}s", "left_s": left_s})
    assert stream.getvalue().splitlines() == [
        "scoring: 3,000 images",
        "scoring: 6,000 images",
        "scoring: 9,000 images",
        "epoch 1/2  loss 0.1",
        "epoch 2/2: at 132s",
    ]  # not at 125 (too soon) or 131 (ending)


def test_a_worker_says_and_reports_through_its_stdout(capfd):
    """The driver tells our lines from other output by these marks (filter_worker_output)."""
    from digit_models.runtime.console import report_progress, say

    say("epoch 1/1  loss 0.5")
    report_progress(images=4096)
    written = capfd.readouterr().out.splitlines()
    assert written == [SAY + "epoch 1/1  loss 0.5", PROGRESS + json.dumps({"images": 4096})]


def test_training_reports_progress_within_long_epochs_only(capfd):
    """Rank 0's callback, driven by a real Keras fit: within-epoch reports only where the
    epoch is predicted to last longer than the threshold."""
    import numpy as np

    from digit_models.runtime.tf_setup import keras
    from digit_models.training.callbacks import ProgressLine
    from digit_models.training.handoff import TrainingState

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((64, 4), np.float32), np.zeros((64, 2), np.float32)
    entry = {"epoch": 1, "loss": 0.5, "images_per_s": 100.0, "epoch_s": 0.1, "elapsed_s": 0.1}
    for longer_than_s, reports in ((0.0, 8), (3600.0, 0)):
        callback = ProgressLine(
            epochs=1, steps=8, state=TrainingState(history=[entry]), every_s=0.0, longer_than_s=longer_than_s
        )
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback], verbose=0)
        written = capfd.readouterr().out.splitlines()
        progress = [json.loads(line[len(PROGRESS) :])["text"] for line in written if line.startswith(PROGRESS)]
        assert len(progress) == reports
        assert all(
            re.fullmatch(r"epoch 1/1: \d+% \(\d/8 steps\), \d+s left in the epoch", text) for text in progress
        ), progress
        assert written[-1] == SAY + "epoch 1/1  loss 0.5000  100 img/s  epoch 0.1s  elapsed 0.1s"


def test_scoring_progress_counts_images_of_the_whole_input(kaggle_dir, ray_local):
    import ray

    from digit_models.scoring.predict import ScoringProgress
    from digit_models.scoring.predict_input import Inspections, open_input

    inspections = Inspections(open_input(str(kaggle_dir / "test.csv")), tasks=1)
    ray.get(inspections.refs)
    progress = ScoringProgress(inspections)
    progress({"images": 500})
    shown = progress({"images": 500})
    assert re.fullmatch(r"scoring: 1,000 of 1,500 images, [\d,]+ images/s, \d+s left", shown["text"])
    assert shown["left_s"] >= 0


def test_what_a_survivor_says_when_its_peer_dies_is_left_to_rays_logs():
    """A worker whose peer's node is gone: TensorFlow's collective and coordination-service
    errors (as CI runs' survivors printed them) stay off the console; Ray says what happened."""
    from digit_models.runtime.console import _shown

    survivor = [
        "2026-12-03 07:58:01.1: E tensorflow/core/common_runtime/ring_alg.cc:291] Aborting RingReduce with x",
        "/job:worker/replica:0/task:1",
        "The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. "
        "preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']",
        "The error could be from a previous operation. Restart your program to reset. "
        "[type.googleapis.com/tensorflow.DerivedStatus='']",
        # after rank 0, which serves the coordination, was frozen for longer than its heartbeat timeout
        "",
        "RPC: /tensorflow.CoordinationService/Heartbeat",
    ]
    ours = ["epoch 2/4  loss 0.1", "a line of a user's own that mentions /job:worker/replica:0/task:1 midway"]
    assert _shown(survivor + ours) == ours


def test_the_gcs_saying_a_finished_actor_was_gone_before_its_kill_is_left_to_rays_logs():
    """As a command's Ray Data actors are stopped, the GCS can find one's process already gone
    and say so in any of these ways (the last came before a one-line error in a run of the suite)."""
    from digit_models.runtime.console import _shown

    prefix = "(pid=gcs_server) [2026-12-06 13:08:54,910 E 4562 4562] (gcs_server) gcs_actor_scheduler.cc:538: "
    gone = [
        prefix + "Failed to kill actor 5a6d, return status: IOError: Socket closed",
        prefix + "Failed to kill actor 5a6d, return status: Unavailable: failed to connect to all addresses",
        prefix + "Failed to kill actor 5a6d, return status: Invalid: KillActor RPC failed for actor 5a6d: "
        "RpcError: RPC error: recvmsg:Connection reset by peer rpc_code: 14",
    ]
    ours = ["digits: error: test.csv: row 40: has 392 columns, expected 784"]
    assert _shown(gone + ours) == ours

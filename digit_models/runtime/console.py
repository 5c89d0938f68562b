"""What reaches the user's console: our own lines, real warnings and errors, and not the chatter
of libraries that every process of a run would print again.

- TensorFlow's CUDA build prints C++ start-up lines from every process, even on machines
  without a GPU ("Could not find cuda drivers", "failed call to cuInit", abseil's "All log
  messages before absl::InitializeLog()"), which TF_CPP_MIN_LOG_LEVEL no longer hides.
- Ray's core worker says, for every actor that Ray Data or Ray Train create with arguments in
  the object store, that a restart could not recover them; and as an embedded Ray shuts down,
  that an actor it was stopping had already gone. Neither is anything a user can act on.

They are written from C++ to file descriptor 2, so they are caught there: in our own processes
while TensorFlow loads, in the driver for the whole command; from Ray's worker processes, whose
output Ray forwards to the driver, they are dropped on the way to the console. Ray's log files
keep everything.

Our own workers and actors talk to the user through the same forwarding: `say` a line (the
driver prints it without Ray's "(RayTrainWorker pid=...)" prefix), or `report_progress`, which
the driver draws as one live line on a terminal and at most once every 30 s into a log.

No line shown carries a URI's credentials (files.without_credentials): not our own, whose
errors name locations, nor a library's that quotes one.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

from digit_models.runtime import seams
from digit_models.storage.files import without_credentials

NOISE = re.compile(
    r"absl::InitializeLog\(\) is called|\] oneDNN custom operations are on|cudart_stub\.cc"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit|cuda_diagnostics\.cc|cuda_dnn\.cc"
    r"|cuda_fft\.cc|cuda_blas\.cc|computation_placer\.cc|TF-TRT Warning"
    r"|has constructor arguments in the object store and max_restarts > 0"
    r"|Failed to kill actor .*(Socket closed|failed to connect|Connection reset by peer)"
    # A worker's collective all-reduce aborting because a peer died, which Ray reports itself.
    r"|ring_alg\.cc:\d+\] Aborting RingReduce|base_collective_executor\.cc:\d+\] BaseCollectiveExecutor::StartAbort"
    r"|^Additional GRPC error information from remote target|^:UNKNOWN:Error received from peer"
    # ... and TensorFlow's coordination service saying the same, in several lines.
    r"|^/job:worker/replica:\d+/task:\d+$|^The tasks have crashed\. Check the task logs"
    r"|^The error could be from a previous operation\. Restart your program to reset"
    r"|^RPC: /tensorflow\.CoordinationService/\w+|^$"
    # A lost node: what the GCS says as it gives up on it (retold below) and on its resources.
    r"|^\s*\(\d\) raylet (crashes unexpectedly|has lagging heartbeats)"
    r"|gcs_placement_group_scheduler\.cc:\d+\S* Failed to (remove|cancel|return)"
    # The raylet's advice when a node runs more Python processes than CPUs: a search's trials
    # each have a driver, a Ray Train controller and a queue besides their workers, by design.
    r"|PYTHON worker processes have been started on node"
    # serve.shutdown() kills Serve's controller once it has stopped the replicas and proxies,
    # while the controller's own shutdown task is still pending: Ray reports the kill (and, on
    # a cluster, the proxies' pending watch of the controller too).
    r"|Task ServeController\.(graceful_shutdown|listen_for_change) failed"
)


@contextmanager
def startup_noise_filtered():
    """Everything written to file descriptor 2 inside the block, but the noise."""
    with tempfile.TemporaryFile() as caught:
        try:
            with _stderr_to(caught.fileno()):
                yield
        finally:
            caught.seek(0)
            _pass_on(caught, os.fdopen(os.dup(2), "wb", buffering=0))


@contextmanager
def stderr_filtered():
    """File descriptor 2 passed through a filter for as long as the block runs: the driver's
    own Ray and TensorFlow libraries write there from C++ at any moment of a command.

    A crash (SIGSEGV and the like) would end the filter's thread with the process, so Python's
    report of it, every thread's stack, goes to the console directly."""
    read_end, write_end = os.pipe()
    forwarder = threading.Thread(
        target=_pass_on,
        args=(os.fdopen(read_end, "rb"), os.fdopen(os.dup(2), "wb", buffering=0)),
        name="digits-stderr",
        daemon=True,
    )
    forwarder.start()
    crash_report = os.fdopen(os.dup(2), "wb", buffering=0)
    faulthandler.enable(crash_report, all_threads=True)
    try:
        with _stderr_to(write_end):
            os.close(write_end)  # fd 2 holds the pipe's only write end: restoring it ends the pipe
            yield
    finally:
        faulthandler.disable()
        crash_report.close()
        forwarder.join(timeout=5)


@contextmanager
def _stderr_to(fd: int):
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _pass_on(lines, out) -> None:
    """Copies the lines that are not noise, with no URI's credentials (whoever wrote them: our
    error lines, a library quoting a location) and otherwise byte for byte; closes both ends."""
    with lines, out:
        for line in lines:
            text = line.decode(errors="replace")
            if not NOISE.search(text):
                shown = without_credentials(text)
                out.write(line if shown == text else shown.encode())


# Ray's own lines said in fewer words (its log files keep them whole).
RETOLD = [
    (
        re.compile(
            r"A worker died or was killed while executing a task by an unexpected system "
            r"error\..*Worker PID: (\d+).*Worker exit type: (\w+)"
        ),
        r"Ray: worker process \1 died unexpectedly (\2); Ray's logs have the details",
    ),
    (
        re.compile(
            r"The node with node id: \w+ and address: (\S+) .*has been marked dead because the "
            r"detector has missed too many heartbeats"
        ),
        r"Ray: node \1 is gone (it stopped answering); Ray's logs have the details",
    ),
]

# Ray Train's worker prints the training function's error, with its traceback and whatever
# TensorFlow adds to it, and then ends; the error reaches the driver, which says it in one line
# (with the traceback under --debug), or restarts the workers and records why (training/attempts.py).
# Everything that worker prints from there on is left out.
FAILED = "Error in training function:"

# Ray Train's controller logs every error it handles with its traceback (a failed group start,
# each minute, while it waits for nodes); what it decides reaches the console through our own
# controller callback's lines (attempts.WorkerGroupWatch) and the command's end. Its
# placement-group cleaner prints a traceback when it cannot find the State API (a machine with
# two Rays), and has nothing to say to a user otherwise.
RAY_TRAIN_ACTORS = ("TrainController", "PlacementGroupCleaner")
# More actors whose output stays in Ray's logs, named by the commands that start them (`digits
# tune`'s trial actors and report queues, whose stops are the search's own doing).
_quiet_actors: set[str] = set()


def quiet_actors(*names: str) -> None:
    """Keeps the output of the actors of these (class) names off the console from now on."""
    _quiet_actors.update(names)


SAY = "digits-say "  # a worker's line for the console
PROGRESS = "digits-progress "  # a worker's progress message (JSON)


def say(line: str) -> None:
    """From a Ray worker: a line for the user's console."""
    _to_driver(SAY + line)


def report_progress(**message) -> None:
    """From a Ray worker: how far it is, for the driver's live line: a `text` (with `left_s`,
    the seconds it expects to take still), or what the command's own formatter turns into one
    (see `LiveLine.formatter`)."""
    _to_driver(PROGRESS + json.dumps(message))


def _shown(lines: list[str]) -> list[str]:
    """What of Ray's lines reaches the console: not the noise, some said more briefly, none
    with a URI's credentials."""
    return [without_credentials(_retold(line)) for line in lines if not NOISE.search(line)]


def _retold(line: str) -> str:
    for pattern, shorter in RETOLD:
        found = pattern.search(line)
        if found:
            return found.expand(shorter)
    return line


def _to_driver(line: str) -> None:
    # Straight to the process's stdout, which Ray forwards: Ray Train re-routes print()
    # through logging, where TensorFlow's handlers would print the line twice.
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


class LiveLine:
    """The driver's console: our lines, and one progress line below them, redrawn in place on
    a terminal; in a log, written out once progress has gone on `log_every_s` seconds since
    the log's latest line, unless it says it is about to end."""

    def __init__(self, stream=None, terminal: bool | None = None, log_every_s: float = 30.0, clock=time.monotonic):
        self._stream, self._terminal = stream, terminal  # default: sys.stdout as it is when used
        self.log_every_s, self.clock = log_every_s, clock
        self.formatter = None  # message -> {"text", "left_s"}, for messages without a `text`
        # Whether our workers' lines and progress reach the console: a search (`digits tune`)
        # says what its trials do itself, as its trials' workers' lines would not say which
        # trial they are of.
        self.from_workers = True
        self.shown, self.logged_at = False, None
        self.lock = threading.Lock()

    @property
    def stream(self):
        return self._stream or sys.stdout

    @property
    def terminal(self) -> bool:
        return self.stream.isatty() if self._terminal is None else self._terminal

    def line(self, text: str) -> None:
        with self.lock:
            self._erase()
            self.stream.write(without_credentials(text) + "\n")
            self.stream.flush()
            if self.logged_at is not None:  # the log's 30 s count from its latest line
                self.logged_at = self.clock()

    def progress(self, message: dict) -> None:
        if "text" not in message and self.formatter:
            message = self.formatter(message)
        text = message.get("text")
        with self.lock:
            if not text:
                return
            if self.terminal:
                self.stream.write(f"\r{text}\x1b[K")
                self.shown = True
            elif self.logged_at is None:  # a log hears of progress only once it has lasted
                self.logged_at = self.clock()
            elif (
                self.clock() - self.logged_at >= self.log_every_s
                and message.get("left_s", math.inf) >= self.log_every_s / 3
            ):  # not "1s left"
                self.stream.write(text + "\n")
                self.logged_at = self.clock()
            self.stream.flush()

    def clear(self) -> None:
        """Erases the live line (before a command's own closing lines)."""
        with self.lock:
            self._erase()
            self.formatter, self.logged_at = None, None

    def _erase(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.shown = False


live = LiveLine()


def filter_worker_output() -> None:
    """Worker output on this driver's console: our workers' lines without Ray's prefix, their
    progress as the live line, the rest as Ray prints it, without the noise."""
    dispatcher = seams.borrow(seams.STDSTREAM_DISPATCHER)
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if not printers:  # log_to_driver is off, or already filtered
        return

    failed: set = set()  # the worker processes whose training function has failed

    def print_filtered(batch: dict, print_logs=printers[0]) -> None:
        lines, pid = [], batch.get("pid")
        actor = batch.get("actor_name") or ""
        kept_in_logs = any(name in actor for name in (*RAY_TRAIN_ACTORS, *_quiet_actors))
        for line in batch.get("lines", []):
            if pid in failed or kept_in_logs and not line.startswith(SAY):
                continue
            if line.startswith(FAILED):
                failed.add(pid)
            elif line.startswith(SAY):
                if live.from_workers:
                    live.line(line[len(SAY) :])
            elif line.startswith(PROGRESS):
                if live.from_workers:
                    live.progress(json.loads(line[len(PROGRESS) :]))
            else:
                lines.append(line)
        lines = _shown(lines)
        if lines:
            print_logs({**batch, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_filtered)
    _filter_error_messages()


def _filter_error_messages() -> None:
    """The messages Ray's raylet sends the driver (a worker died, say) bypass the handler
    above: Ray's error listener calls print_to_stdstream itself, by its module-level name."""
    print_to_stdstream = seams.borrow(seams.PRINT_TO_STDSTREAM)
    if getattr(print_to_stdstream, "filters_noise", False):
        return

    def print_filtered(data: dict, ignore_prefix: bool) -> None:
        lines = _shown(data.get("lines", []))
        if lines:
            print_to_stdstream({**data, "lines": lines}, ignore_prefix)

    print_filtered.filters_noise = True
    seams.replace(seams.PRINT_TO_STDSTREAM, print_filtered)

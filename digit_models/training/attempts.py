"""Every start of a run's worker group, and every worker failure that Ray Train reports, on
record in RUN_DIR/attempts/ (on the run's storage, which every node reaches):

    <ms>-start.json       rank 0, as its group starts: its size, and what it resumed from
    <ms>-failure.json     Ray Train's controller, when it finds workers failed: their errors
    <ms>-restart.json     the controller, as it ends a group to start another: why (a failure,
                          a preemption, a resize to the nodes there are) and the group's size
    <ms>-waiting.json     the controller, when too few workers can start: how many, since when
    <ms>-preemption.json  rank 0, on a preemption notice: the checkpoint taken for it
    <ms>-fault.json       a fault injected on purpose (DIGITS_FAULT, for tests)

named by the Unix time in milliseconds, so that the names sort in time order. run.json's
"restarts" is read from them: each start after the first, why it happened, and from where.
"""

from __future__ import annotations

import socket
import time

import ray.train

from digit_models.runtime import seams
from digit_models.runtime.console import say
from digit_models.runtime.ray_runtime import count_nodes_now
from digit_models.errors import WorkersUnavailable, first_line
from digit_models.storage.files import Folder
from digit_models.storage.run_dir import RunDir

ControllerCallback = seams.borrow(seams.CONTROLLER_CALLBACK)
(SchedulingState, RunningState, ResizingState, RestartingState, ReschedulingState) = seams.borrow(
    seams.CONTROLLER_STATES
)
is_preemption_failure = seams.borrow(seams.PREEMPTION_FAILURE)


def _folder(run_location: str) -> Folder:
    return Folder(RunDir(run_location).child(RunDir.ATTEMPTS))


def record(run_location: str, kind: str, entry: dict) -> None:
    folder = _folder(run_location)
    folder.create()
    now = time.time()
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), **entry}
    folder.write_json(f"{int(now * 1000):013d}-{kind}.json", entry)


def timeline(run_location: str) -> list[tuple[float, str, dict]]:
    """Every record, oldest first: (Unix time, kind, entry). (A writer killed midway can leave
    only a hidden temporary file, which is not a record.)"""
    folder = _folder(run_location)
    found = []
    for name in folder.names():
        if not name.endswith(".json"):
            continue
        milliseconds, _, kind = name.removesuffix(".json").partition("-")
        found.append((int(milliseconds) / 1000, kind, folder.read_json(name)))
    return found


def recorded(run_location: str, kind: str) -> list[dict]:
    return [entry for _, found, entry in timeline(run_location) if found == kind]


class FailureRecorder(ray.train.UserCallback):
    """Runs in Ray Train's controller: the errors of failed workers, before it restarts them."""

    def __init__(self, run_location: str):
        self.run_location = run_location

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        try:
            # A worker that died first: the others' errors (a broken collective) follow from it.
            ranks = sorted(
                worker_exceptions, key=lambda rank: (not hasattr(worker_exceptions[rank], "health_check_failure"), rank)
            )
            record(
                self.run_location,
                "failure",
                {"errors": {str(rank): _described(worker_exceptions[rank]) for rank in ranks}},
            )
        except OSError:  # storage full or gone: the failure itself is what the user will see
            pass


class WorkerGroupWatch(ControllerCallback):
    """Runs in Ray Train's controller and follows its states: every worker group ended and
    every one started, on record with its size; a lost worker or node said on the console at
    once; and a run that cannot start `min_workers` workers ended after `wait_s` seconds
    (Ray Train would go on trying for ever), resumable with `digits train --resume`.

    The hooks are Ray Train 2.60's controller callbacks (pyproject.toml pins the version)."""

    def __init__(self, run_location: str, min_workers: int, max_workers: int, wait_s: float):
        self.run_location, self.min_workers, self.max_workers = run_location, min_workers, max_workers
        self.wait_s = wait_s
        self.group_size, self.waiting_since, self.said_waiting = 0, None, False

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, SchedulingState):
            self.group_size = current_state.scaling_decision.num_workers
        elif isinstance(current_state, RunningState):
            self.waiting_since, self.said_waiting = None, False
        elif isinstance(current_state, ResizingState) and not isinstance(previous_state, ResizingState):
            size = current_state.scaling_decision.num_workers
            self._record("restart", {"why": "resize", "workers_from": self.group_size, "workers_to": size})
            say(
                f"nodes changed: restarting the workers from the last checkpoint with {size} of "
                f"{self.max_workers} (were {self.group_size})"
            )
        elif isinstance(current_state, RestartingState) and not isinstance(previous_state, RestartingState):
            error = current_state.training_failed_error
            why = "preemption" if is_preemption_failure(error) else "failure"
            self._record("restart", {"why": why, "workers_from": self.group_size, "error": _described(error)})
            self.waiting_since = time.time()
            preempted = getattr(getattr(error, "preemption_info", None), "preempted_node_ids", [])
            _wait_until_gone(preempted or _nodes_not_answering())
            count_nodes_now()
            lost = _lost_ranks(error)
            what = (
                f"lost worker(s) {', '.join(map(str, lost))} of {self.group_size}"
                if lost
                else f"the {self.group_size}-worker group failed ({_first_error(error)})"
            )
            plan = (
                f"waiting at most {self.wait_s:.0f} s for {self.min_workers} workers"
                if self.min_workers == self.max_workers
                else f"restarting with the workers the cluster has ({self.min_workers} to {self.max_workers})"
            )
            say(f"{what}; {why}: {plan}")
        elif isinstance(current_state, (RestartingState, ReschedulingState)):
            self._keep_waiting()

    def _keep_waiting(self) -> None:
        """Still fewer workers than the run needs (a start that timed out, or an elastic policy
        that found too few): on record once, then the run ends when the wait is over."""
        self.waiting_since = self.waiting_since or time.time()
        waited = time.time() - self.waiting_since
        if not self.said_waiting:
            self._record("waiting", {"workers_needed": self.min_workers, "since": self.waiting_since})
            self.said_waiting = True
        if waited >= self.wait_s:
            raise WorkersUnavailable(
                f"fewer than {self.min_workers} worker(s) could start for {waited:.0f} s "
                f"(--wait-for-workers {self.wait_s:g}); continue with `digits train --resume "
                f"{self.run_location}` once the cluster has the nodes, or train with a smaller "
                "--min-workers"
            )

    def _record(self, kind: str, entry: dict) -> None:
        try:
            record(self.run_location, kind, entry)
        except OSError:  # storage full or gone: what happens next is what the user will see
            pass


def _nodes_not_answering() -> list[str]:
    """The nodes Ray still counts whose raylet no longer takes connections: a node that has
    just died (Ray's GCS agrees only once it has missed its heartbeats for a while)."""
    gone = []
    for node in ray.nodes():
        if node["Alive"]:
            try:
                socket.create_connection(
                    (node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=RAYLET_ANSWER_S
                ).close()
            except OSError:
                gone.append(node["NodeID"])
    return gone


RAYLET_ANSWER_S = 2.0


def _wait_until_gone(node_ids: list[str], timeout_s: float = 30.0) -> None:
    """Until Ray counts these nodes out (or `timeout_s`): preempted ones, or ones that have
    stopped answering. A restart decided before that (or before the autoscaling coordinator
    counts the nodes again, count_nodes_now) would try to start workers on them, and wait out
    Ray Train's start timeout before it tries again without them. Blocks the controller's loop
    meanwhile; the group is already ended."""
    deadline = time.time() + timeout_s
    while node_ids and time.time() < deadline:
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        if not alive & set(node_ids):
            return
        time.sleep(0.5)


def _lost_ranks(error) -> list[int]:
    """The ranks whose worker process is gone, killed or with its node (a worker that failed
    with an error of its own is not lost)."""
    failures = getattr(error, "worker_failures", None) or {}
    return sorted(
        rank
        for rank, failure in failures.items()
        if isinstance(getattr(failure, "health_check_failure", failure), ray.exceptions.ActorDiedError)
    )


def _first_error(error) -> str:
    """The first worker's error, for a console line (attempts/ has them all)."""
    failures = getattr(error, "worker_failures", None) or {}
    first = failures[min(failures)] if failures else error
    return f"rank {min(failures)}: {_described(first)}" if failures else _described(first)


def _described(exc: BaseException) -> str:
    """The error and what caused it, a line each joined: Ray Train's health-check error says
    only that a check failed, and keeps the reason (a dead actor, say) beside it."""
    parts = [f"{type(exc).__name__}: {first_line(exc)}"]
    cause = getattr(exc, "health_check_failure", None) or exc.__cause__
    if cause is not None:
        parts.append(f"{type(cause).__name__}: {first_line(cause)}")
    return " <- ".join(parts)


def restarts(run_location: str) -> list[dict]:
    """Each worker-group start after the run's first: when, with how many workers, from which
    epoch (and image, after a preemption's checkpoint), what kind of restart (failure,
    preemption, resize, resume) and why (the worker errors Ray Train reported before it)."""
    found, failures, ended, previous = [], [], None, None
    for _, kind, entry in timeline(run_location):
        if kind == "failure":
            failures.append(entry)
        elif kind == "restart":
            ended = entry
        elif kind == "start":
            if previous is not None:
                if entry["driver_session"] != previous["driver_session"]:
                    what, why = "resume", "digits train --resume"
                else:
                    what = ended["why"] if ended else "failure"
                    why = (
                        "; ".join(f"rank {rank}: {error}" for rank, error in failures[-1]["errors"].items())
                        if failures
                        else ended.get("error", "the nodes changed")
                        if ended
                        else "unknown (no worker error was reported)"
                    )
                found.append(
                    {
                        "at": entry["at"],
                        "kind": what,
                        "workers": entry.get("workers"),
                        "resumed_after_epoch": entry["resumed_after_epoch"],
                        "resumed_at_image": entry.get("resumed_at_image", 0),
                        "why": why,
                    }
                )
            previous, failures, ended = entry, [], None
    return found


def group_sizes(run_location: str) -> list[int]:
    """The size of every worker group the run started, in order."""
    return [entry["workers"] for entry in recorded(run_location, "start")]

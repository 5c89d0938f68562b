"""Every start of a run's worker group, and every worker failure that Ray Train reports, on
record in RUN_DIR/attempts/ (on the run's storage, which every node reaches):

    <ms>-start.json     rank 0, as its group starts: what it resumed from
    <ms>-failure.json   Ray Train's controller, when it finds workers failed: their errors
    <ms>-fault.json     a fault injected on purpose (DIGITS_FAULT, for tests)

named by the Unix time in milliseconds, so that the names sort in time order. run.json's
"restarts" is read from them: each start after the first, why it happened, and from where.
"""

from __future__ import annotations

import json
import time

import ray.train

from digit_models.errors import first_line
from digit_models.files import Folder
from digit_models.run_dir import RunDir


def _folder(run_location: str) -> Folder:
    return Folder(RunDir(run_location).child(RunDir.ATTEMPTS))


def record(run_location: str, kind: str, entry: dict) -> None:
    folder = _folder(run_location)
    folder.create()
    now = time.time()
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), **entry}
    folder.write_text(f"{int(now * 1000):013d}-{kind}.json", json.dumps(entry) + "\n")


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
            ranks = sorted(worker_exceptions, key=lambda rank: (
                not hasattr(worker_exceptions[rank], "health_check_failure"), rank))
            record(self.run_location, "failure", {"errors": {
                str(rank): _described(worker_exceptions[rank]) for rank in ranks}})
        except OSError:  # storage full or gone: the failure itself is what the user will see
            pass


def _described(exc: BaseException) -> str:
    """The error and what caused it, a line each joined: Ray Train's health-check error says
    only that a check failed, and keeps the reason (a dead actor, say) beside it."""
    parts = [f"{type(exc).__name__}: {first_line(exc)}"]
    cause = getattr(exc, "health_check_failure", None) or exc.__cause__
    if cause is not None:
        parts.append(f"{type(cause).__name__}: {first_line(cause)}")
    return " <- ".join(parts)


def restarts(run_location: str) -> list[dict]:
    """Each worker-group start after the run's first: when, from which epoch, and why (the
    worker errors Ray Train reported before it, or the driver's --resume)."""
    found, failures, previous = [], [], None
    for _, kind, entry in timeline(run_location):
        if kind == "failure":
            failures.append(entry)
        elif kind == "start":
            if previous is not None:
                if entry["driver_session"] != previous["driver_session"]:
                    why = "digits train --resume"
                elif failures:
                    why = "; ".join(f"rank {rank}: {error}" for rank, error in failures[-1]["errors"].items())
                else:
                    why = "unknown (no worker error was reported)"
                found.append({"at": entry["at"], "resumed_after_epoch": entry["resumed_after_epoch"],
                              "why": why})
            previous, failures = entry, []
    return found

"""`digits runs`: the run directories in a folder, one line each: the model, epochs run, the
best validation accuracy and its epoch, and the state:

    finished    run.json is there
    failed      no run.json, and the last record in attempts/ is a worker failure that no restart
                or resume followed (Ray Train gave up: --max-failures was spent)
    unfinished  started.json only: running, stopped (Ctrl-C, a lost machine, too few workers),
                and resumable with `digits train --resume`
    unreadable  its run.json or started.json is not one we wrote (`--json` says why, as `problem`)

An unfinished run's epochs are its newest complete checkpoint's (training/checkpoints.py).
"""

from __future__ import annotations

from digit_models.errors import DigitsError
from digit_models.storage.files import Folder
from digit_models.storage.run_dir import RunDir
from digit_models.training.checkpoints import newest_complete
from digit_models.training.handoff import TrainingState

COLUMNS = ("run", "model", "epochs", "best val_accuracy", "state")


def list_runs(location: str) -> list[dict]:
    """Every run directory directly in `location` (a path or URI), sorted by name."""
    folder = Folder(location)
    if not folder.is_folder():
        raise DigitsError(f"{location}: no such folder")
    found = []
    for name in folder.names():
        run = RunDir(folder.child(name))
        if run.is_file(RunDir.RUN) or run.is_file(RunDir.STARTED):
            found.append({"run": name, "location": run.given, **describe(run)})
    return found


def describe(run: RunDir) -> dict:
    """A run directory's model, epochs run and planned, best val_accuracy and its epoch, the
    val_accuracy of model.keras's epoch (the last of an unfinished run), the stop reason (a
    finished run's) and state."""
    stop_reason, model_epoch = None, None
    try:
        if run.is_finished:
            summary = run.read_run()
            history, state = summary.get("history") or [], "finished"
            stop_reason, model_epoch = summary.get("stop_reason"), summary.get("model_epoch")
            model, epochs, planned = summary.get("model"), summary.get("epochs_run"), summary.get("epochs_planned")
        else:
            started = run.read_started()
            if not isinstance(started, dict):
                raise DigitsError(f"{run.child(RunDir.STARTED)}: unreadable: not a JSON object")
            config = started.get("config") or {}
            checkpoint = newest_complete(run.location)
            progress = checkpoint.state if checkpoint else TrainingState()
            history, state = progress.history, "failed" if _gave_up(run) else "unfinished"
            model, epochs = config.get("model"), progress.epochs_done
            planned = progress.epochs_planned(config.get("epochs"))
    except DigitsError as exc:  # one damaged run does not hide the others
        return {
            "model": None,
            "epochs_run": None,
            "epochs_planned": None,
            "best_val_accuracy": None,
            "best_epoch": None,
            "val_accuracy": None,
            "stop_reason": None,
            "state": "unreadable",
            "problem": str(exc),
        }
    validated = [entry for entry in history if "val_accuracy" in entry]
    best = max(validated, key=lambda entry: entry["val_accuracy"], default=None)
    return {
        "model": model,
        "epochs_run": epochs,
        "epochs_planned": planned,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "val_accuracy": next(
            (entry.get("val_accuracy") for entry in reversed(history) if model_epoch in (None, entry.get("epoch"))),
            None,
        ),
        "stop_reason": stop_reason,
        "state": state,
    }


def _gave_up(run: RunDir) -> bool:
    if not run.exists(RunDir.ATTEMPTS):
        return False
    from digit_models.training.attempts import timeline  # here: it loads Ray Train

    records = timeline(run.location)
    return bool(records) and records[-1][1] == "failure"


def format_runs(found: list[dict]) -> str:
    """A table with a header line, columns padded to their widest entry."""
    if not found:
        return "no runs here (folders holding started.json or run.json)"
    rows = [
        COLUMNS,
        *(
            [
                entry["run"],
                entry["model"] or "?",
                f"{entry['epochs_run'] or 0} of {entry['epochs_planned'] or '?'}",
                (
                    f"{entry['best_val_accuracy']:.4f} (epoch {entry['best_epoch']})"
                    if entry["best_val_accuracy"] is not None
                    else "-"
                ),
                entry["state"],
            ]
            for entry in found
        ),
    ]
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

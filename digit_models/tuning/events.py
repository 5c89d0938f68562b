"""What the search says and records as it goes, from Ray Tune's driver-side callback: a console
line per trial event (started, an epoch's result every few epochs, stopped early, finished,
failed), the live line on a terminal, and the results tables rewritten as trials end."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from ray import cloudpickle, tune

from digit_models.errors import first_line
from digit_models.runtime.console import live
from digit_models.storage.files import Folder
from digit_models.tuning.results import trial_row, write_results
from digit_models.tuning.space import option, trial_settings
from digit_models.tuning.trial import trial_name, trial_run_dir

# Set by Ctrl-C during a search (the search's driver then ends with KeyboardInterrupt, once Ray
# Tune has saved the search's state).
SEARCH_INTERRUPTED = threading.Event()

# Tune's trial states as the table says them; a trial left running or pending when the search
# stops is unfinished (a resumed search continues it).
STATES = {
    "PENDING": "pending",
    "RUNNING": "running",
    "PAUSED": "running",
    "ERROR": "failed",
    "TERMINATED": "stopped early",
}
ENDED = ("TERMINATED", "ERROR")


class TrialEvents(tune.Callback):
    """Runs in the `digits tune` process. Picklable as it is made (Ray Tune keeps it in the
    search's saved state, and a resumed search gets it back from there)."""

    def __init__(self, tune_dir: str, trials: int, epochs: int, fixed: dict, model: str, time_budget_s: float | None):
        self.tune_dir, self.trials, self.epochs, self.fixed = tune_dir, trials, epochs, fixed
        self.model = model  # the trials' model, unless sampled
        self.time_budget_s = time_budget_s
        self.every = max(1, epochs // 5)  # epoch lines: about five per trial

    def setup(self, **info):
        """Notes a Ctrl-C on the way to Ray Tune's own handler, which Tune has just put in:
        it ends the search at its next step, saving its state for a resume, and puts back the
        handler that was there before, so that a second Ctrl-C interrupts at once."""
        self.started = time.monotonic()
        SEARCH_INTERRUPTED.clear()
        self.best: float | None = None
        # The trials seen to end: Ray Tune marks the trials it stops on a Ctrl-C as ended too
        # (in memory; its saved state has them running), and those are unfinished.
        self.ended: set[str] | None = None
        self.running: set[str] = set()  # Tune tells of a start, and of an end, before its state says so
        tune_handler = signal.getsignal(signal.SIGINT)

        def interrupted(signum, frame):
            SEARCH_INTERRUPTED.set()
            if callable(tune_handler):
                tune_handler(signum, frame)

        signal.signal(signal.SIGINT, interrupted)

    def on_step_begin(self, iteration, trials, **info):
        if self.ended is None:  # the first step: the trials a resumed search found ended
            self.ended = {trial.trial_id for trial in trials if trial.status in ENDED}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        settings = ", ".join(
            f"{option(field)} {_shown(value)}" for field, value in trial_settings(trial.config, self.model).items()
        )
        self._say(f"trial {trial_name(trial.trial_id)} started: {settings or 'the fixed settings'}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch, accuracy = result.get("epoch"), result.get("val_accuracy")
        if accuracy is not None:
            self.best = accuracy if self.best is None else max(self.best, accuracy)
        if epoch is not None and accuracy is not None and epoch % self.every == 0:
            self._say(f"trial {trial_name(trial.trial_id)}: epoch {epoch}, val_accuracy {accuracy:.4f}")
        else:
            self._live()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self.running.discard(trial.trial_id)
        name = trial_name(trial.trial_id)
        last = trial.last_result
        run = trial_run_dir(self.tune_dir, name)
        if run.is_finished:
            summary = run.read_run()
            self._say(
                f"trial {name} finished: {summary['epochs_run']} epochs, val_accuracy "
                f"{summary['history'][-1].get('val_accuracy', float('nan')):.4f} "
                f"({summary['stop_reason']})"
            )
        else:
            why = "the search's time budget ran out" if self._budget_spent() else "below the scheduler's cutoff"
            after = f"after epoch {last['epoch']}" if "epoch" in last else "before its first epoch ended"
            self._say(
                f"trial {name} stopped early {after} (val_accuracy {last.get('val_accuracy', float('nan')):.4f}, {why})"
            )
        self.write(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self.running.discard(trial.trial_id)
        self._say(f"trial {trial_name(trial.trial_id)} failed: {trial_error(trial)}")
        self.write(trials)

    def on_experiment_end(self, trials, **info):
        if not SEARCH_INTERRUPTED.is_set():  # the trials the search's end stopped: its time budget
            for trial in trials:
                if trial.trial_id not in (self.ended or ()):
                    live.line(f"trial {trial_name(trial.trial_id)} left unfinished: the search's time budget ran out")
        self.write(trials, ended=True)

    def write(self, trials, ended: bool = False) -> dict | None:
        """The tables, as they stand; at the end, a trial that did not end is unfinished."""
        rows = []
        for trial in sorted(trials, key=lambda trial: trial.trial_id):
            state = STATES.get(trial.status, trial.status.lower())
            if ended and (state in ("running", "pending") or trial.trial_id not in (self.ended or ())):
                state = "unfinished"
            name = trial_name(trial.trial_id)
            rows.append(
                trial_row(
                    name,
                    state,
                    trial_settings(trial.config, self.model),
                    trial_run_dir(self.tune_dir, name),
                    trial.last_result.get("time_total_s"),
                    trial_error(trial) if trial.status == "ERROR" else None,
                )
            )
        return write_results(Folder(self.tune_dir), rows, self.fixed)

    def _budget_spent(self) -> bool:
        return self.time_budget_s is not None and time.monotonic() - self.started >= self.time_budget_s

    def _say(self, text: str) -> None:
        live.line(text)
        self._live()

    def _live(self) -> None:
        best = f", best val_accuracy {self.best:.4f}" if self.best is not None else ""
        live.progress({"text": f"trials {len(self.ended or ())}/{self.trials} done, {len(self.running)} running{best}"})


def trial_error(trial) -> str:
    """A failed trial's error in one line: our own error's message where there is one (a Ray
    error's text carries the remote traceback after it). Ray Tune has just written it beside
    the search's state when it tells the callbacks, and copies it to storage later."""
    local = trial.pickled_error_file
    if local and Path(local).is_file():
        error = cloudpickle.loads(Path(local).read_bytes())
    else:
        error = trial.get_pickled_error()
    while getattr(error, "cause", None) is not None:  # Ray's task errors keep the original here
        error = error.cause
    return first_line(error) if error is not None else "failed (Ray Tune's log has why)"


def _shown(value) -> str:
    """A sampled value as a space file would give it."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else str(value)

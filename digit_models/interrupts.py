"""Ctrl-C and SIGTERM: every command stops cleanly, whatever it is doing when the signal comes.

The policy, in one place:

- Both signals become exceptions on the main thread: Ctrl-C Python's KeyboardInterrupt, SIGTERM
  `Terminated` (`sigterm_raises`). They unwind the command like any error, so every `finally`
  and context manager runs on the way out: the embedded Ray is shut down (no raylet left
  running), staged output folders are removed, nothing half-written stays behind.
- Libraries are not allowed to take the signals over. `ray.init` replaces SIGTERM's handler with
  one that calls sys.exit (`keep_sigterm_handler` puts ours back), and Ray Train's fit()
  installs a SIGINT handler that ends the process with status 0 or 1, skipping our cleanup
  (`call_interruptibly` runs such calls on a helper thread, the main thread keeping Ctrl-C).
- The command exits 130 after Ctrl-C and 143 after SIGTERM (`EXIT_STATUS`), with one line
  saying so, also when a library re-wrapped the interrupt on its way up.
- Once the cleanup has run, the process ends at once (`exit_now`): Python's own shutdown with
  TensorFlow's and Ray's native threads still winding down can crash (seen: SIGSEGV after
  Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every cleanup runs."""


EXIT_STATUS = {KeyboardInterrupt: 130, Terminated: 143}
MESSAGE = {KeyboardInterrupt: "interrupted", Terminated: "terminated"}


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_raises():
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def keep_sigterm_handler(handler) -> None:
    """Puts back the SIGTERM handler a library replaced (when there was one of ours)."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def exit_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def call_interruptibly(function):
    """Runs function() in a helper thread and returns its result, leaving Ctrl-C and SIGTERM
    to the main thread."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001  (re-raised on the main thread)
            outcome["error"] = exc

    on_main_thread = threading.current_thread() is threading.main_thread()
    caller_sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    if caller_sigint is None:  # set outside Python, so it cannot be put back: Python's default
        caller_sigint = signal.default_int_handler
    worker = threading.Thread(target=call, name="digits-ray-call", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            if on_main_thread:
                # Installed again each time, as native code can take the signal over without
                # Python's own record of the handler changing.
                signal.signal(signal.SIGINT, caller_sigint)
            worker.join(timeout=0.2)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, caller_sigint)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

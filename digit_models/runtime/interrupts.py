"""Ctrl-C and SIGTERM: every command stops cleanly, whatever it is doing when the signal comes.

The policy, in one place:

- Both signals become exceptions on the main thread: Ctrl-C Python's KeyboardInterrupt, SIGTERM
  `Terminated` (`sigterm_raises`). They unwind the command like any error, so every `finally`
  and context manager runs on the way out: the embedded Ray is shut down (no raylet left
  running), staged output folders are removed, nothing half-written stays behind.
- Libraries are not allowed to take the signals over. `ray.init` replaces SIGTERM's handler with
  one that calls sys.exit (`keep_sigterm_handler` puts ours back), and Ray Train's fit() would
  install a SIGINT handler that ends the process with status 0 or 1, skipping our cleanup
  (training/backend.py's trainer keeps the run's controller instead, and stops the run itself).
- `Terminated` is a KeyboardInterrupt, so that whatever stops on Ctrl-C stops on SIGTERM too:
  a wait inside Ray (ray.get) runs the handlers and turns a KeyboardInterrupt into a fresh
  one, and drops any other exception. That a SIGTERM came is therefore also remembered
  (`interruption_kind`).
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every cleanup runs."""


EXIT_STATUS = {KeyboardInterrupt: 130, Terminated: 143}
MESSAGE = {KeyboardInterrupt: "interrupted", Terminated: "terminated"}


_sigterm_received = threading.Event()


def _raise_terminated(signum, frame):
    _sigterm_received.set()
    raise Terminated()


@contextmanager
def sigterm_raises():
    _sigterm_received.clear()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption_kind() -> type[KeyboardInterrupt]:
    """Terminated once SIGTERM came, even if a library re-raised it as a plain KeyboardInterrupt."""
    return Terminated if _sigterm_received.is_set() else KeyboardInterrupt


def keep_sigterm_handler(handler) -> None:
    """Puts back the SIGTERM handler a library replaced (when there was one of ours)."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def exit_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

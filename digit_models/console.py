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
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager

NOISE = re.compile(
    r"absl::InitializeLog\(\) is called|\] oneDNN custom operations are on|cudart_stub\.cc"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit|cuda_diagnostics\.cc|cuda_dnn\.cc"
    r"|cuda_fft\.cc|cuda_blas\.cc|computation_placer\.cc|TF-TRT Warning"
    r"|has constructor arguments in the object store and max_restarts > 0"
    r"|Failed to kill actor .* (Socket closed|failed to connect)")


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
    own Ray and TensorFlow libraries write there from C++ at any moment of a command."""
    read_end, write_end = os.pipe()
    forwarder = threading.Thread(
        target=_pass_on, args=(os.fdopen(read_end, "rb"), os.fdopen(os.dup(2), "wb", buffering=0)),
        name="digits-stderr", daemon=True)
    forwarder.start()
    try:
        with _stderr_to(write_end):
            os.close(write_end)  # fd 2 holds the pipe's only write end: restoring it ends the pipe
            yield
    finally:
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
    """Copies the lines that are not noise, byte for byte, and closes both ends."""
    with lines, out:
        for line in lines:
            if not NOISE.search(line.decode(errors="replace")):
                out.write(line)


def filter_worker_output() -> None:
    """Drops the noise from the worker output Ray prints on this driver's console."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if not printers:  # log_to_driver is off, or already filtered
        return

    def print_filtered(batch: dict, print_logs=printers[0]) -> None:
        lines = [line for line in batch.get("lines", []) if not NOISE.search(line)]
        if lines:
            print_logs({**batch, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_filtered)

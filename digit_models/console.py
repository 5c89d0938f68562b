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
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not NOISE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


@contextmanager
def stderr_filtered():
    """File descriptor 2 passed through a filter for as long as the block runs: the driver's
    own Ray and TensorFlow libraries write there from C++ at any moment of a command."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as lines, os.fdopen(os.dup(original), "wb", buffering=0) as out:
            for line in lines:
                if not NOISE.search(line.decode(errors="replace")):
                    out.write(line)

    forwarder = threading.Thread(target=forward, name="digits-stderr", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the forwarder reads to its end
        os.close(original)
        forwarder.join(timeout=5)


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

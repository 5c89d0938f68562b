"""This process's own peak memory, for the records our commands write (predict.json), and
handing memory its allocator keeps back to the system."""

from __future__ import annotations

import ctypes
import resource
import sys

STATUS = "/proc/self/status"


def peak_rss_mb() -> float:
    """The peak resident memory of this program since it started, in MB.

    Not getrusage's ru_maxrss: Linux carries that over an exec from the process it replaced,
    so a command started by a large process (a notebook's kernel, a benchmark harness) reported
    its parent's size. /proc's VmHWM is the peak of this program's own memory map."""
    try:
        with open(STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # No /proc (not Linux): ru_maxrss is in bytes on macOS, kilobytes elsewhere.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def return_freed_memory() -> None:
    """Hands the memory that glibc's allocator keeps after it is freed back to the system.

    For after a burst of many small short-lived native allocations, such as parsing Parquet
    footers (every row group's metadata for every column, in several threads): glibc keeps what
    they freed in each thread's arena, and a driver's memory otherwise grows with the rows in
    its input files. The process's own C library, whichever it is: nothing to do where it is
    not glibc."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)

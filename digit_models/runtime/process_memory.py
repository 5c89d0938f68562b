"""This process's own peak memory, for the records our commands write (predict.json)."""

from __future__ import annotations

import resource

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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: kilobytes on Linux

"""What a machine's CPU can do, read from /proc/cpuinfo (no TensorFlow import needed)."""

from __future__ import annotations

import platform
import socket

from digit_models.errors import DigitsError

CPUINFO = "/proc/cpuinfo"
BFLOAT16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's two; Arm's "bf16" feature


def cpu_has_bfloat16(cpuinfo: str) -> bool | None:
    """Whether /proc/cpuinfo's text lists a bfloat16 instruction set; None when it lists no
    flags at all (not Linux, or a format we do not know): then we cannot tell."""
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & BFLOAT16_CPU_FLAGS) if flags else None


def this_cpu_has_bfloat16() -> bool | None:
    """cpu_has_bfloat16 of this machine's /proc/cpuinfo; None where there is none."""
    try:
        with open(CPUINFO) as file:
            return cpu_has_bfloat16(file.read())
    except OSError:
        return None


def require_bfloat16_cpu() -> None:
    """For bfloat16 compute asked for by name (--precision bfloat16 on CPU workers): refuses a
    CPU that lacks its instructions, where it is slow or fails (oneDNN refused a bfloat16
    convolution when held to AVX2 here); lets a CPU it cannot tell about through."""
    if this_cpu_has_bfloat16() is False:
        raise DigitsError(
            f"--precision bfloat16: the CPU of {socket.gethostname()} ({platform.machine()}) "
            "has no bfloat16 instructions (AVX512-BF16, AMX or Arm BF16), without which "
            "bfloat16 is slow or fails; train with --precision auto or float32, or on GPU workers"
        )

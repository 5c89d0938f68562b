"""The CPU a benchmark ran on, from /proc/cpuinfo: its model and the flags of the instructions
that TensorFlow's float32 and bfloat16 kernels run on (AVX2, FMA, AVX-512, AMX)."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    found = re.findall(r"\b(avx2|fma|avx512\w*|amx\w*)\b", _cpuinfo() if cpuinfo is None else cpuinfo)
    return sorted(set(found))


def cpu_description() -> str:
    """'MODEL; CPU flags FLAG, ...' (the first CPU's model)."""
    cpuinfo = _cpuinfo()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    name = model.group(1).strip() if model else platform.processor() or "CPU unknown"
    return f"{name}; CPU flags {', '.join(cpu_flags(cpuinfo)) or 'none'}"

"""Output that appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


@contextmanager
def staged_dir(target: Path):
    """Yields an empty hidden folder beside `target` to write into. When the block succeeds
    the folder takes target's name (replacing a previous output there); when it fails it is
    deleted. A process killed midway leaves only a hidden `.NAME.partial-PID-*` folder, which
    the next run for the same target removes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        previous = target.parent / f".{target.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, previous)
        os.rename(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(staging, target)


def _remove_abandoned(target: Path) -> None:
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        pid = leftover.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

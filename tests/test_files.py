"""Output files on a local disk that others can write to as well: temporary files that cannot
be redirected, leftovers matched by name only, and records read only up to their size."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from digit_models.errors import DigitsError
from digit_models.storage.files import RECORD_BYTES, Folder, staged_dir


def test_a_link_planted_at_a_temporary_name_is_not_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's")
    out = tmp_path / "run"
    out.mkdir()
    # Where the temporary file used to be (its name known in advance: the writer's pid).
    (out / f".run.json.{os.getpid()}.tmp").symlink_to(victim)
    Folder(str(out)).write_text("run.json", "{}\n")
    assert victim.read_text() == "someone else's"
    assert (out / "run.json").read_text() == "{}\n" and not (out / "run.json").is_symlink()

    # Even a link at the very name it draws is refused, not followed (O_EXCL).
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    (out / f".run.json.{uuid.UUID(int=7).hex}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        Folder(str(out)).write_text("run.json", '{"again": 1}\n')
    assert victim.read_text() == "someone else's" and (out / "run.json").read_text() == "{}\n"


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_target_named_with_glob_characters_removes_only_its_own_leftovers(tmp_path):
    dead = _dead_pid()
    own = tmp_path / f".scored[1].partial-{dead}-aaaaaaaa"
    others = tmp_path / f".scored1.partial-{dead}-bbbbbbbb"  # what the unescaped glob matched
    for leftover in (own, others):
        leftover.mkdir()
        (leftover / "submission.csv").write_text("x")
    with staged_dir(tmp_path / "scored[1]") as staging:
        (staging / "submission.csv").write_text("ImageId,Label\n")
    assert (tmp_path / "scored[1]" / "submission.csv").read_text() == "ImageId,Label\n"
    assert not own.exists()
    assert (others / "submission.csv").read_text() == "x"


def test_a_record_larger_than_ours_can_be_is_refused_unread(tmp_path):
    with open(tmp_path / "predict.json", "wb") as record:
        record.truncate(RECORD_BYTES + 1)  # sparse: no disk needed
    with pytest.raises(DigitsError, match=r"predict.json: more than 64 MiB; too large for one of our records"):
        Folder(str(tmp_path)).read_json("predict.json")

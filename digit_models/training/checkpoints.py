"""A run's per-epoch checkpoints: what a worker writes, and which one a new worker group
resumes from.

Ray Train hands a restarted worker group the last checkpoint its controller registered, and it
registers one only once every rank's report has reached it, polling the workers every 2 s. A
worker that dies after rank 0 has uploaded an epoch's checkpoint but before that registration
would send the new group back an epoch (or to scratch), though the checkpoint is whole in
storage. So a new group resumes from the newest complete checkpoint in storage instead: one
whose state.json gives its model file's size and sha256, and whose model.keras matches them
(an upload cut short leaves a mismatch or no state.json at all).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from digit_models.errors import DigitsError
from digit_models.nets.model_file import load_model_bytes
from digit_models.storage.files import RECORD_BYTES, Folder
from digit_models.storage.run_dir import RunDir
from digit_models.training.handoff import TrainingState


def write_checkpoint(directory: str, model, state: TrainingState, in_epoch: dict | None = None) -> None:
    """The model (with its optimizer state) and the run's state, into a local folder; for a
    checkpoint taken within an epoch, which epoch and how many of its images are done."""
    model_file = Path(directory, RunDir.MODEL)
    # The format named explicitly: tf-keras keeps "use the .keras format" in a thread-local
    # that its first save resets to False in a non-main thread (Ray Train's), after which a
    # "model.keras" would silently be written as HDF5.
    model.save(model_file, save_format="keras_v3")
    written = model_file.read_bytes()
    Path(directory, RunDir.STATE).write_text(
        json.dumps(
            {
                **state.to_record(),
                **({"in_epoch": in_epoch} if in_epoch else {}),
                "model_bytes": len(written),
                "model_sha256": hashlib.sha256(written).hexdigest(),
            }
        )
    )


def load_with_optimizer(model_file: bytes, name: str):
    """A checkpoint's model with its optimizer state, checked and loaded in safe mode
    (nets/model_file.py), our optimizer classes registered first (Keras finds a schedule nested
    in an optimizer's config only by its registered name)."""
    from digit_models.training import schedule, weight_average  # noqa: F401  (they register)

    return load_model_bytes(model_file, name, compile=True)


@dataclass(frozen=True)
class SavedCheckpoint:
    state: TrainingState
    in_epoch: dict | None  # a checkpoint taken within an epoch: {"epoch", "images_done"}
    model_file: bytes


def newest_complete(run_location: str) -> SavedCheckpoint | None:
    """The run's checkpoint with the most epochs (and images of the next) done whose model
    file is whole; None when there is none (a run from scratch)."""
    checkpoints = Folder(RunDir(run_location).child(RunDir.CHECKPOINTS))
    found = []
    for name in checkpoints.names():
        try:
            state = json.loads(Folder(checkpoints.child(name)).read_text(RunDir.STATE, RECORD_BYTES))
            # Newest first: a checkpoint taken within an epoch (for a preemption) is newer than
            # the one that ended the epoch before, which has the same epochs done.
            found.append((state["epochs_done"], state.get("in_epoch", {}).get("images_done", 0), name, state))
        except (OSError, ValueError, KeyError, TypeError, DigitsError):  # not a checkpoint, or cut short
            continue
    for _, _, name, state in sorted(found, reverse=True):
        try:
            model = Folder(checkpoints.child(name)).read_bytes(RunDir.MODEL)
        except OSError:
            continue
        if len(model) == state.get("model_bytes") and hashlib.sha256(model).hexdigest() == state.get("model_sha256"):
            return SavedCheckpoint(TrainingState.from_record(state), state.get("in_epoch"), model)
    return None

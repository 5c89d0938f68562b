"""A run directory, what `digits train --out` makes, and the one place that knows its layout:

    started.json   written first: the configuration and the data's checksum (what --resume reads)
    checkpoints/   Ray Train's per-epoch checkpoints, each with state.json (epochs, history)
    attempts/      each worker-group start and worker failure (training/attempts.py)
    tensorboard/   TensorBoard's event file, rewritten by rank 0 after every epoch
    model.keras    the trained model, native Keras format
    run.json       written last: a run directory without it is unfinished

A local run directory is made absolute (Ray's storage paths must be); a URI (s3://, gs://) is
kept as given, for clusters whose nodes share no disk.
"""

from __future__ import annotations

import json
import zipfile
from io import BytesIO
from pathlib import Path

from digit_models.errors import DigitsError, first_line
from digit_models.storage.files import Folder, is_uri, require_output_folder


# The per-epoch numbers of a run's history that TensorBoard and MLflow chart (step = epoch).
# Each history entry also has "ended_unix", when the epoch ended (0 in runs started before it
# was recorded), which is where the charts put it in time.
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_s")


class RunDir(Folder):
    MODEL = "model.keras"
    STARTED = "started.json"
    RUN = "run.json"
    CHECKPOINTS = "checkpoints"
    ATTEMPTS = "attempts"
    TENSORBOARD = "tensorboard"
    STATE = "state.json"  # inside each checkpoint

    def __init__(self, location: str):
        super().__init__(location if is_uri(location) else str(Path(location).resolve()))
        self.given = str(location)  # how messages name it

    @property
    def is_finished(self) -> bool:
        return self.exists(self.RUN)

    def require_new(self) -> None:
        """For `digits train --out`: a new or empty folder, with a hint for an unfinished run."""
        if self.exists(self.RUN):
            raise DigitsError(f"{self}: already holds a finished run; choose another --out")
        if self.exists(self.STARTED):
            raise DigitsError(
                f"{self}: holds an unfinished run; continue it with "
                f"`digits train --resume {self}` or choose another --out"
            )
        require_output_folder(self, "choose another --out")

    def read_started(self) -> dict:
        """started.json of an unfinished run, for --resume."""
        if self.exists(self.RUN):
            raise DigitsError(f"{self}: already finished ({self.RUN} is there); nothing to resume")
        if not self.is_file(self.STARTED):
            raise DigitsError(f"{self}: no {self.STARTED}, so not a run directory `digits train` started")
        return self.read_json(self.STARTED)

    def write_started(self, started: dict) -> None:
        self.create()
        self.write_json(self.STARTED, started)

    def write_run(self, summary: dict) -> None:
        self.write_json(self.RUN, summary)

    def read_run(self) -> dict:
        """run.json of a finished run."""
        self._require_finished()
        run = self.read_json(self.RUN)
        if not isinstance(run, dict):
            raise DigitsError(f"{self.child(self.RUN)}: unreadable: not a JSON object")
        return run

    def model_bytes(self) -> bytes:
        """The finished run's model file, checked to be a Keras archive without loading it
        (that needs TensorFlow, which the scoring actors load; they check the rest). Bytes,
        so that actors on any node receive it through Ray rather than reading this disk."""
        self._require_finished()
        if not self.is_file(self.MODEL):
            raise DigitsError(f"{self.given}: no {self.MODEL}")
        content = self.read_bytes(self.MODEL)
        try:
            with zipfile.ZipFile(BytesIO(content)) as archive:
                json.loads(archive.read("config.json"))
                archive.getinfo("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise DigitsError(f"{self.child(self.MODEL)}: not a loadable Keras model: {first_line(exc)}") from None
        return content

    def _require_finished(self) -> None:
        if not self.is_folder():
            raise DigitsError(f"{self.given}: no such run directory")
        if not self.exists(self.RUN):
            raise DigitsError(f"{self.given}: no {self.RUN}, so not a finished run")

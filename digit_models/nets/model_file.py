"""The one way a model file is loaded: checked first, then loaded in Keras safe mode.

Safe mode alone does not make a model file safe to load (issue 38). tf-keras applies it only to
a real `.keras` zip archive: any other file, whatever its name, goes to the HDF5 or SavedModel
loader, which runs a Lambda layer's Python bytecode. Inside an archive, safe mode still imports
whatever module config.json names and calls `from_config` on what it finds there, and it reads
config.json whole before looking at it (a zip bomb). The weights are an HDF5 file, whose
datasets can read their bytes from any file on the machine (external storage), need filter
plugins loaded from disk, or declare terabytes filled on read.

So `check_keras_archive` takes a file apart without TensorFlow (callers check before
TensorFlow loads where they can): a zip holding exactly the entries a tf-keras `keras_v3` save
writes, each within its size cap (as declared in the zip's directory, and again as read), a
config.json that names only the classes our models and their training are built from, and
weights that are plain datasets inside the file. `load_model_bytes` then loads what it checked,
from the very bytes it checked, in safe mode.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from digit_models.errors import DigitsError, first_line

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

# What a tf-keras keras_v3 save writes for our models (no assets: none of their layers has any),
# and the most each entry may hold uncompressed. Ours: config.json up to 21 KB (deep_cnn under a
# mixed-precision policy, compiled with AveragingAdam and WarmupCosine), metadata.json 64 bytes,
# weights up to 16.3 MB (the seed's CNN with Adam's slots and the weight average, under
# mixed_float16).
ENTRY_LIMITS = {CONFIG: 1 << 20, METADATA: 64 << 10, WEIGHTS: 256 << 20}
# A whole model file read into memory (load_model_file): its entries, and room for the zip's headers.
ARCHIVE_LIMIT = sum(ENTRY_LIMITS.values()) + (1 << 20)

# The classes config.json may name, as (module, class_name, registered_name): the tf-keras
# layers, initializers, dtype policy, optimizer and loss that the registry's models
# (nets/models.py) and worker.compiled_model are built from, and our own registered classes.
# tf-keras resolves a registered name first, then imports the module and takes the class from
# it, and calls its from_config: so all three must match. Names inside configs that are strings
# ("relu", "accuracy") are looked up only among tf-keras's own objects and registered classes,
# never imported. A model built from a new kind of layer needs its class added here
# (tests/test_model_trust.py saves and loads every registered model).
KERAS_CLASSES = {
    "keras": {"Sequential"},
    "keras.layers": {
        "InputLayer",
        "Rescaling",
        "Flatten",
        "Reshape",
        "Dense",
        "Conv2D",
        "MaxPooling2D",
        "BatchNormalization",
        "Activation",
        "Dropout",
    },
    "keras.initializers": {"GlorotUniform", "Zeros", "Ones"},
    "keras.mixed_precision": {"Policy"},
    "keras.optimizers": {"Adam"},
    "keras.losses": {"CategoricalCrossentropy"},
}
OUR_CLASSES = {  # registered by digit_models/training/weight_average.py and training/schedule.py
    ("digit_models.training.weight_average", "AveragingAdam", "digits>AveragingAdam"),
    ("digit_models.training.schedule", "WarmupCosine", "digits>WarmupCosine"),
    # Where they were before the package's split: runs saved then name these (Keras finds the
    # classes by their registered names, not by the module).
    ("digit_models.weight_average", "AveragingAdam", "digits>AveragingAdam"),
    ("digit_models.schedule", "WarmupCosine", "digits>WarmupCosine"),
}
ALLOWED_CLASSES = {(module, name, None) for module, names in KERAS_CLASSES.items() for name in names} | OUR_CLASSES
NAMING_KEYS = ("module", "class_name", "registered_name")
# What holds Python bytecode in a config: a Lambda layer, and the function inside one.
CODE_CLASSES = {"Lambda", "__lambda__"}


def check_keras_archive(data: bytes | str | os.PathLike, name: str) -> None:
    """Refuses (DigitsError, one line naming `name`) a model file, given as its bytes or its
    path, that is not a Keras archive of our models as described above."""
    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data) as archive:
            entries = _entries(archive, name)
            config = _read_entry(archive, entries[CONFIG], name)
            _read_entry(archive, entries[METADATA], name)
            weights = _read_entry(archive, entries[WEIGHTS], name)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        RuntimeError,
        NotImplementedError,
        zlib.error,
    ) as exc:  # RuntimeError: an encrypted entry
        raise DigitsError(f"{name}: not a loadable Keras model: {first_line(exc)}") from None
    _check_config(config, name)
    _check_weights(weights, name)


def load_model_bytes(data: bytes, name: str, compile: bool = False):
    """The model in a model file's bytes, checked by `check_keras_archive` and then loaded in
    Keras safe mode, as saved (its dtype policy too). With its optimizer (`compile`) only once
    our optimizer classes are registered: training/checkpoints.py's `load_with_optimizer`.
    Under a distribution strategy call it inside strategy.scope()."""
    check_keras_archive(data, name)
    from digit_models.runtime.tf_setup import keras

    # The bytes checked, in a file of our own: Keras loads from a path, and one named
    # .keras that is a zip goes to the archive loader, the one that applies safe mode.
    with tempfile.TemporaryDirectory(prefix="digits-model-") as directory:
        path = Path(directory, "model.keras")
        path.write_bytes(data)
        try:
            return keras.models.load_model(path, compile=compile, safe_mode=True)
        except Exception as exc:  # noqa: BLE001  (Keras raises many types for a bad file)
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise DigitsError(f"{name}: not a loadable Keras model: {message[:200]}") from None


def read_model_file(path: str, name: str) -> bytes:
    """A local model file's bytes, refused unread when larger than any model archive may be."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > ARCHIVE_LIMIT:
                raise DigitsError(
                    f"{name}: not a loadable Keras model: {size:,} bytes, more than "
                    f"the {ARCHIVE_LIMIT:,} a model archive may hold"
                )
            return file.read()
    except OSError as exc:
        raise DigitsError(f"{name}: cannot read: {first_line(exc)}") from None


def _entries(archive: zipfile.ZipFile, name: str) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by name: exactly those a keras_v3 save writes, each once, each
    declaring no more than its cap."""
    infos = archive.infolist()
    counts = Counter(info.filename for info in infos)
    doubled = [entry for entry, count in counts.items() if count > 1]
    unexpected = [entry for entry in counts if entry not in ENTRY_LIMITS]
    missing = [entry for entry in ENTRY_LIMITS if entry not in counts]
    if doubled or unexpected or missing:
        problem = (
            f"holds {_shown(doubled[0])} twice"
            if doubled
            else f"holds {_shown(unexpected[0])}, which a Keras model archive does not"
            if unexpected
            else f"has no {missing[0]}"
        )
        raise DigitsError(f"{name}: not a loadable Keras model: the archive {problem}")
    for info in infos:
        if info.file_size > ENTRY_LIMITS[info.filename]:
            raise DigitsError(
                f"{name}: refused: {info.filename} declares {info.file_size:,} bytes "
                f"uncompressed, more than the {ENTRY_LIMITS[info.filename]:,} allowed"
            )
    return {info.filename: info for info in infos}


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    """An entry's content, read to its end (so zipfile checks its CRC) and never past its cap,
    whatever its header declares."""
    limit = ENTRY_LIMITS[info.filename]
    with archive.open(info) as entry:
        content = entry.read(limit + 1)
    if len(content) > limit:
        raise DigitsError(f"{name}: refused: {info.filename} holds more than the {limit:,} bytes allowed uncompressed")
    return content


def _check_config(content: bytes, name: str) -> None:
    """Every object config.json names is one of ALLOWED_CLASSES (walked without recursion:
    the JSON may nest as deep as json.loads allows)."""
    try:
        config = json.loads(content)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DigitsError(f"{name}: not a loadable Keras model: {CONFIG} is not JSON ({first_line(exc)})") from None
    pending = [config]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            if any(key in node for key in NAMING_KEYS):
                _check_named(node, name)
            pending.extend(node.values())


def _check_named(node: dict, name: str) -> None:
    named = tuple(node.get(key, "(none)") for key in NAMING_KEYS)
    if named in ALLOWED_CLASSES:
        return
    if node.get("class_name") in CODE_CLASSES:
        raise DigitsError(
            f"{name}: refused: the model contains Python code (e.g. a Lambda "
            "layer), which Keras safe mode does not load"
        )
    module, class_name, registered_name = (_shown(value) for value in named)
    raise DigitsError(
        f"{name}: refused: {CONFIG} names {class_name} of module {module} "
        f"(registered name {registered_name}), which no model of ours is built from"
    )


def _shown(value) -> str:
    """A value from the file, quoted on one line and cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_weights(content: bytes, name: str) -> None:
    """The weights file holds only groups and datasets reached by links inside it; each
    dataset's bytes stored in the file unfiltered, and all of them no more than the weights'
    cap. HDF5 would otherwise read a dataset's bytes from another file on this machine
    (external storage, virtual datasets, external links), load filter plugins from disk, or
    fill a dataset declared terabytes long."""
    import h5py

    problems = []

    def link_problem(path: str, link) -> None:
        if not isinstance(link, h5py.HardLink):
            problems.append(f"{path!r} is a {type(link).__name__}")

    total = 0

    def object_problem(path: str, item) -> None:
        nonlocal total
        if isinstance(item, h5py.Dataset):
            if item.is_virtual or item.external or item.id.get_create_plist().get_nfilters():
                problems.append(f"dataset {path!r} is stored outside the file or filtered")
            total += item.nbytes
        elif not isinstance(item, h5py.Group):
            problems.append(f"{path!r} is a {type(item).__name__}")

    try:
        with h5py.File(io.BytesIO(content), "r") as weights:
            weights.visititems_links(link_problem)
            weights.visititems(object_problem)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # what h5py raises for a bad file
        raise DigitsError(
            f"{name}: not a loadable Keras model: {WEIGHTS} is not an HDF5 file ({first_line(exc)})"
        ) from None
    if total > ENTRY_LIMITS[WEIGHTS]:
        problems.append(f"its datasets hold {total:,} bytes, more than the {ENTRY_LIMITS[WEIGHTS]:,} allowed")
    if problems:
        raise DigitsError(f"{name}: refused: {WEIGHTS}: {problems[0]}")

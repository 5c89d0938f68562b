"""A model file cannot run code, import modules or exhaust memory when loaded (issue 38):
crafted files, built here, refused with one line and nothing executed; and every model a
training run writes still loads."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from digit_models.errors import DigitsError
from digit_models.nets.model_file import CONFIG, ENTRY_LIMITS, METADATA, WEIGHTS, load_model_bytes
from digit_models.nets.models import MODELS, build_model, load_model_file
from tests.conftest import REPO, run_digits

PYTHON_CODE = "refused: the model contains Python code (e.g. a Lambda layer), which Keras safe mode does not load"
NOT_A_ZIP = "not a loadable Keras model: File is not a zip file"


def _saved(model, tmp_path: Path) -> bytes:
    path = tmp_path / "saved.keras"
    model.save(path, save_format="keras_v3")
    return path.read_bytes()


def _entries(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(BytesIO(archive)) as opened:
        return {name: opened.read(name) for name in opened.namelist()}


def _zipped(entries: dict[str, bytes]) -> bytes:
    content = BytesIO()
    with zipfile.ZipFile(content, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return content.getvalue()


def _with_config(archive: bytes, edit) -> bytes:
    """The archive with its config.json changed by `edit` (which changes the dict in place)."""
    entries = _entries(archive)
    config = json.loads(entries[CONFIG])
    edit(config)
    return _zipped({**entries, CONFIG: json.dumps(config).encode()})


def _run_dir_holding(model_file: bytes, where: Path) -> Path:
    """A finished run directory as far as predict and export can tell, with this model file."""
    where.mkdir()
    (where / "run.json").write_text(json.dumps({"model": "dense"}))
    (where / "model.keras").write_bytes(model_file)
    return where


def _refused_by_the_commands(run: Path, tmp_path: Path, kaggle_dir: Path, message: str) -> list[str]:
    """`digits predict` and `digits export` on the run: each one stderr line ending in
    `message`, exit status 2, no output; returns what they printed on stdout."""
    printed = []
    for command in (
        ["predict", "--run", str(run), "--input", str(kaggle_dir / "test.csv"), "--out", str(tmp_path / "scored")],
        ["export", "--run", str(run), "--out", str(tmp_path / "exported")],
    ):
        done = run_digits(*command, timeout=120)
        assert (done.returncode, done.stderr.splitlines()) == (
            2,
            [f"digits: error: {run / 'model.keras'}: {message}"],
        ), command
        printed.append(done.stdout)
    assert not (tmp_path / "scored").exists() and not (tmp_path / "exported").exists()
    return printed


@pytest.fixture(scope="module")
def dense_archive(tmp_path_factory) -> bytes:
    """A real model file: the registry's dense net, saved as training saves it."""
    return _saved(build_model("dense"), tmp_path_factory.mktemp("dense"))


@pytest.fixture
def hdf5_with_code(tmp_path) -> tuple[Path, Path]:
    """An HDF5 model whose Lambda layer creates a marker file, saved under the name
    model.keras; and the marker. Shown to run its code under Keras's own loader first, safe
    mode or not, so that its refusal below means something."""
    from digit_models.runtime.tf_setup import keras

    marker = tmp_path / "code-ran"
    source = f"def touch(x):\n    import pathlib\n    pathlib.Path({str(marker)!r}).touch()\n    return x\n"
    namespace = {}
    exec(source, namespace)  # a function with real source: Keras stores its bytecode in the file
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Lambda(namespace["touch"]),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp_path / "model.keras"
    model.save(path, save_format="h5")
    marker.unlink()  # building the model called the Lambda
    keras.models.load_model(path, safe_mode=True)
    assert marker.exists(), "the crafted file does not run its code under Keras's own loader"
    marker.unlink()
    return path, marker


def test_an_hdf5_model_named_model_keras_is_refused_unrun(hdf5_with_code, tmp_path, kaggle_dir):
    path, marker = hdf5_with_code
    with pytest.raises(DigitsError) as refused:
        load_model_bytes(path.read_bytes(), "crafted/model.keras")
    assert str(refused.value) == f"crafted/model.keras: {NOT_A_ZIP}"
    with pytest.raises(DigitsError) as refused:
        load_model_file(str(path))
    assert str(refused.value) == f"{path}: {NOT_A_ZIP}"
    run = _run_dir_holding(path.read_bytes(), tmp_path / "run")
    _refused_by_the_commands(run, tmp_path, kaggle_dir, NOT_A_ZIP)
    assert not marker.exists()


# The code of a config.json naming a foreign module or class would run inside Keras's loader.
FOREIGN_NAMES = {
    # tf-keras imports the module, here the standard library's `this`, which prints the Zen of Python.
    "module": (
        lambda config: config.update(module="this"),
        "refused: config.json names 'Sequential' of module 'this' (registered name None), "
        "which no model of ours is built from",
    ),
    # A Python function by module and name as an activation, called on every prediction.
    "function": (
        lambda config: config["config"]["layers"][3]["config"].update(
            activation={"module": "os", "class_name": "function", "config": "system", "registered_name": "system"}
        ),
        "refused: config.json names 'function' of module 'os' (registered name 'system'), "
        "which no model of ours is built from",
    ),
    # A tf-keras layer our models do not use: TFOpLambda calls any TensorFlow function by name.
    "keras class": (
        lambda config: config["config"]["layers"][1].update(class_name="TFOpLambda"),
        "refused: config.json names 'TFOpLambda' of module 'keras.layers' (registered name None), "
        "which no model of ours is built from",
    ),
    "lambda": (
        lambda config: config["config"]["layers"][3]["config"].update(
            activation={
                "module": "builtins",
                "class_name": "__lambda__",
                "config": {"value": ["", None, None]},
                "registered_name": None,
            }
        ),
        PYTHON_CODE,
    ),
}


@pytest.mark.parametrize("case", sorted(FOREIGN_NAMES))
def test_a_config_naming_anything_our_models_are_not_built_from_is_refused(case, dense_archive, tmp_path):
    edit, message = FOREIGN_NAMES[case]
    crafted = _with_config(dense_archive, edit)
    with pytest.raises(DigitsError) as refused:
        load_model_bytes(crafted, "crafted")
    assert str(refused.value) == f"crafted: {message}"
    (tmp_path / "model.keras").write_bytes(crafted)
    with pytest.raises(DigitsError) as refused:
        load_model_file(str(tmp_path / "model.keras"))
    assert str(refused.value) == f"{tmp_path / 'model.keras'}: {message}"


def test_a_foreign_module_is_never_imported(dense_archive, tmp_path, kaggle_dir, capfd):
    """The module `this` prints the Zen of Python when first imported: refused, nothing is
    printed, in this process or through the commands; Keras alone would have imported it."""
    from digit_models.runtime.tf_setup import keras

    edit, message = FOREIGN_NAMES["module"]
    crafted = _with_config(dense_archive, edit)
    sys.modules.pop("this", None)
    with pytest.raises(DigitsError):
        load_model_bytes(crafted, "crafted")
    assert "this" not in sys.modules and capfd.readouterr().out == ""
    run = _run_dir_holding(crafted, tmp_path / "run")
    assert _refused_by_the_commands(run, tmp_path, kaggle_dir, message) == ["", ""]
    (tmp_path / "unchecked.keras").write_bytes(crafted)
    with pytest.raises(TypeError):  # Sequential is not in `this`, once it is imported
        keras.models.load_model(tmp_path / "unchecked.keras", safe_mode=True)
    assert "Beautiful is better than ugly." in capfd.readouterr().out


# The CRC-32 of 2 GiB of zeros, zlib.crc32(bytes(1 << 31)): the bomb is a valid zip entry.
BOMB_SIZE, BOMB_CRC = 1 << 31, 1304293916


def _zero_bomb() -> bytes:
    """2 GiB of zeros as a 2 MB raw deflate stream: one 16 MiB block compressed with a full
    flush (which makes the next block independent of it) repeated, then the final block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 24)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (BOMB_SIZE >> 24) + compressor.flush()


def _zip_declaring(entries: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip written field by field, each entry (name, data, method, crc, size) declaring the
    uncompressed size and CRC given, whatever its data inflates to."""
    body, directory = b"", b""
    for name, data, method, crc, size in entries:
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0)
        directory += (
            struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(body)) + name.encode()
        )
        body += struct.pack("<I", 0x04034B50) + fields + name.encode() + data
    return (
        body
        + directory
        + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    )


@pytest.mark.parametrize(
    "declared, message",
    [
        (
            BOMB_SIZE,
            f"refused: config.json declares {BOMB_SIZE:,} bytes uncompressed, more than the "
            f"{ENTRY_LIMITS[CONFIG]:,} allowed",
        ),
        # A header that lies: zipfile stops at the size declared, and the CRC of what it read is wrong.
        (1000, "not a loadable Keras model: Bad CRC-32 for file 'config.json'"),
    ],
    ids=["declared", "lying header"],
)
def test_a_zip_bomb_is_refused_without_inflating_it(declared, message, dense_archive):
    entries = _entries(dense_archive)
    bomb = _zip_declaring(
        [
            (CONFIG, _zero_bomb(), zipfile.ZIP_DEFLATED, BOMB_CRC, declared),
            *(
                (name, entries[name], zipfile.ZIP_STORED, zlib.crc32(entries[name]), len(entries[name]))
                for name in (METADATA, WEIGHTS)
            ),
        ]
    )
    tracemalloc.start()
    try:
        with pytest.raises(DigitsError) as refused:
            load_model_bytes(bomb, "bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(refused.value) == f"bomb: {message}"
    assert peak < 16 << 20  # inflating it would take 2 GiB


@pytest.mark.parametrize(
    "entries, problem",
    [
        ({CONFIG, METADATA}, "has no model.weights.h5"),
        ({METADATA, WEIGHTS}, "has no config.json"),
        ({CONFIG, WEIGHTS}, "has no metadata.json"),
        (
            {CONFIG, METADATA, WEIGHTS, "assets/extra.txt"},
            "holds 'assets/extra.txt', which a Keras model archive does not",
        ),
    ],
    ids=["no weights", "no config", "no metadata", "an extra entry"],
)
def test_an_archive_without_exactly_the_entries_of_a_keras_save_is_refused(entries, problem, dense_archive):
    saved = _entries(dense_archive)
    crafted = _zipped({name: saved.get(name, b"extra") for name in sorted(entries)})
    with pytest.raises(DigitsError) as refused:
        load_model_bytes(crafted, "crafted")
    assert str(refused.value) == f"crafted: not a loadable Keras model: the archive {problem}"


def _with_output_bias(archive: bytes, tmp_path: Path, shape: tuple[int, ...] = (10,), **dataset) -> bytes:
    """The archive with its output layer's bias (the dense net's only (10,) dataset) replaced
    by an HDF5 dataset of this shape made with these options."""
    import h5py

    entries = _entries(archive)
    weights = tmp_path / "weights.h5"
    weights.write_bytes(entries[WEIGHTS])
    with h5py.File(weights, "r+") as store:
        paths = []
        store.visititems(lambda path, item: paths.append(path) if getattr(item, "shape", None) == (10,) else None)
        [bias] = paths
        del store[bias]
        store.create_dataset(bias, shape=shape, dtype="float32", **dataset)
    return _zipped({**entries, WEIGHTS: weights.read_bytes()})


def test_weights_read_from_another_file_are_refused(dense_archive, tmp_path):
    """HDF5's external storage reads a dataset's bytes from any file on the machine: into the
    weights, and from there into the next checkpoint written to the run folder."""
    from digit_models.runtime.tf_setup import keras

    secret = tmp_path / "secret"
    secret.write_bytes(b"credentials of this node, forty bytes...")
    crafted = _with_output_bias(dense_archive, tmp_path, external=[(str(secret), 0, 40)])
    with pytest.raises(DigitsError) as refused:
        load_model_bytes(crafted, "crafted")
    assert str(refused.value) == (
        "crafted: refused: model.weights.h5: dataset 'layers/dense_1/vars/1' is stored outside the file or filtered"
    )
    (tmp_path / "unchecked.keras").write_bytes(crafted)
    unchecked = keras.models.load_model(tmp_path / "unchecked.keras", safe_mode=True)
    assert unchecked.layers[-1].bias.numpy().tobytes() == secret.read_bytes()


def test_weights_declaring_more_than_their_cap_are_refused(dense_archive, tmp_path):
    """A billion floats declared, none stored: HDF5 reads them as fill values, 4 GB of them."""
    crafted = _with_output_bias(dense_archive, tmp_path, shape=(10**9,))
    with pytest.raises(
        DigitsError,
        match=r"^crafted: refused: model\.weights\.h5: its datasets hold "
        rf"4,000,\d{{3}},\d{{3}} bytes, more than the {ENTRY_LIMITS[WEIGHTS]:,} allowed$",
    ):
        load_model_bytes(crafted, "crafted")


def test_the_check_runs_without_tensorflow(dense_archive, tmp_path):
    """Callers check before TensorFlow loads (predict's and export's drivers): the check
    imports none of it."""
    (tmp_path / "model.keras").write_bytes(dense_archive)
    script = (
        "import sys\nfrom digit_models.nets.model_file import check_keras_archive\n"
        f"check_keras_archive({str(tmp_path / 'model.keras')!r}, 'model.keras')\n"
        "print(sorted(name for name in ('tensorflow', 'tf_keras', 'keras') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr[-2000:]


# Every model a training run writes, as a checkpoint (compiled, with the optimizer's state) and
# as the run's model.keras (the last checkpoint's file, loaded to score): each registered model
# under each dtype policy with --weight-average (AveragingAdam) and --lr-schedule cosine
# (WarmupCosine); and the plain optimizer at a constant rate, whose classes do not depend on
# the model, with the dense net alone: in float32, and wrapped for loss scaling (mixed_float16).
RUN_MODELS = [
    *((model, policy, True) for model in sorted(MODELS) for policy in ("float32", "mixed_float16", "mixed_bfloat16")),
    *(("dense", policy, False) for policy in ("float32", "mixed_float16")),
]


@pytest.fixture
def dtype_policy():
    """Sets the global dtype policy as a worker's configure_tensorflow does; float32 after."""
    from digit_models.runtime.tf_setup import keras

    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("model_name, policy, averaged", RUN_MODELS)
def test_every_model_a_run_writes_loads(model_name, policy, averaged, tmp_path, dtype_policy, mnist_slice):
    from digit_models.training.checkpoints import load_with_optimizer, newest_complete, write_checkpoint
    from digit_models.training.handoff import TrainingState
    from digit_models.config import TrainConfig
    from digit_models.training.worker import compiled_model

    dtype_policy(policy)
    config = TrainConfig(
        model=model_name, weight_average=0.999 if averaged else 0.0, lr_schedule="cosine" if averaged else "constant"
    )
    model = compiled_model(config, steps=10, workers=1, epochs=2)
    model.optimizer.build(model.trainable_variables)  # as after a training step
    rng = np.random.default_rng(0)
    for variable in model.optimizer.variables:  # values to compare after the load
        variable.assign(rng.integers(1, 100, variable.shape).astype(variable.dtype.as_numpy_dtype))
    checkpoint = tmp_path / "checkpoints" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    write_checkpoint(str(checkpoint), model, TrainingState(epochs_done=1))

    model_file = newest_complete(str(tmp_path)).model_file
    resumed = load_with_optimizer(model_file, "checkpoint")
    assert type(resumed.optimizer) is type(model.optimizer)
    for mine, saved in (
        (resumed.get_weights(), model.get_weights()),
        ([v.numpy() for v in resumed.optimizer.variables], [v.numpy() for v in model.optimizer.variables]),
    ):
        assert len(mine) == len(saved) and all(np.array_equal(a, b) for a, b in zip(mine, saved))

    scoring = load_model_file(str(checkpoint / "model.keras"))
    assert {layer.compute_dtype for layer in scoring.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(scoring.get_weights(), model.get_weights()))
    probabilities = scoring.predict(mnist_slice.images[:4], verbose=0)
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.timeout(400)
def test_a_resume_refuses_a_checkpoint_replaced_by_code(hdf5_with_code, dense_run, tmp_path, shared_ray_env):
    """Someone who can write to the run folder replaces the newest checkpoint's model file, and
    its state.json to match (the size and sha256 check is not what refuses it)."""
    path, marker = hdf5_with_code
    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    for finished in ("run.json", "model.keras", "checkpoints/checkpoint_manager_snapshot.json"):
        (run / finished).unlink()  # an unfinished run; Ray Train's record of it starts afresh
    states = sorted(
        run.glob("checkpoints/*/state.json"), key=lambda state: json.loads(state.read_text())["epochs_done"]
    )
    newest = states[-1].parent
    crafted = path.read_bytes()
    (newest / "model.keras").write_bytes(crafted)
    state = json.loads(states[-1].read_text())
    state.update(model_bytes=len(crafted), model_sha256=hashlib.sha256(crafted).hexdigest())
    states[-1].write_text(json.dumps(state))

    done = run_digits("train", "--resume", str(run), env=shared_ray_env, timeout=380)
    assert not marker.exists()
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        [f"digits: error: {run}/checkpoints: the newest complete checkpoint's model.keras: {NOT_A_ZIP}"],
    ), done.stderr[-3000:]

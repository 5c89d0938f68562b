"""GPU paths, tested as far as a CPU allows: the resources asked of Ray, and mixed precision."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from digit_models.cli import _train_config, build_parser
from digit_models.config import PredictConfig, TrainConfig
from digit_models.runtime.cpu_features import cpu_has_bfloat16
from digit_models.scoring.predict import actor_resources
from digit_models.training.driver import _precision_named, scaling_config
from tests.conftest import REPO


def test_a_cpu_only_run_never_asks_ray_for_a_gpu():
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--workers", "2", "--cpus-per-worker", "1"])
    config = _train_config(args)
    assert config.gpus_per_worker == 0
    scaling = scaling_config(config)
    assert scaling.use_gpu is False and scaling.resources_per_worker == {"CPU": 1}
    assert actor_resources(PredictConfig(runs=["r"], input="i", out="o"), cpus=2) == {"num_cpus": 2}


def test_gpu_workers_and_actors_get_their_gpus():
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--workers",
            "4",
            "--cpus-per-worker",
            "3",
            "--gpus-per-worker",
            "1",
        ]
    )
    config = _train_config(args)
    assert config.compute_policy(cpu_has_bfloat16=False) == "mixed_float16"  # auto, on GPUs
    scaling = scaling_config(config)
    assert scaling.use_gpu is True and scaling.num_workers == 4
    assert scaling.resources_per_worker == {"CPU": 3, "GPU": 1}
    assert actor_resources(PredictConfig(runs=["r"], input="i", out="o", gpus_per_actor=0.5), cpus=2) == {
        "num_cpus": 2,
        "num_gpus": 0.5,
    }


@pytest.mark.parametrize(
    "options, cpu_has_bfloat16, policy",
    [
        ([], True, "mixed_bfloat16"),  # auto, the default: bfloat16 where the CPU has it
        ([], None, "float32"),  # ... not where it cannot tell
        ([], False, "float32"),  # ... nor where it is missing (emulated, slower than float32)
        (["--precision", "float32"], True, "float32"),
        (["--precision", "bfloat16"], True, "mixed_bfloat16"),
        (["--gpus-per-worker", "1"], False, "mixed_float16"),  # auto on GPUs: their fast path
        (["--gpus-per-worker", "1", "--precision", "bfloat16"], False, "mixed_bfloat16"),
        (["--gpus-per-worker", "1", "--precision", "float32"], True, "float32"),
    ],
)
def test_the_precision_a_worker_computes_in(options, cpu_has_bfloat16, policy):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *options])
    assert _train_config(args).compute_policy(cpu_has_bfloat16) == policy


MIXED_PRECISION_PROBE = """
import json, sys
import numpy as np
from digit_models.runtime import cpu_features
cpu_features.CPUINFO = sys.argv[4]
from digit_models.runtime.tf_setup import configure_tensorflow
configure_tensorflow(cpus=1, precision_policy=sys.argv[2])
from digit_models.config import TrainConfig
from digit_models.storage.kaggle_csv import read_train_csv
from digit_models.nets.models import build_model
from digit_models.training.worker import compiled_model
from digit_models.training.weight_average import WeightAverage
import tf_keras as keras
digits = read_train_csv(sys.argv[1], limit=256)
cnn = build_model("cnn")
model = compiled_model(TrainConfig(model="dense", weight_average=0.5), steps=4, workers=1, epochs=10)
history = model.fit(digits.images, keras.utils.to_categorical(digits.labels, 10), batch_size=64,
                    epochs=2, callbacks=[WeightAverage()], verbose=0)
probabilities = model.predict(digits.images[:16], verbose=0)
model.save(sys.argv[3])
from digit_models.nets.models import load_model_file
scorer = load_model_file(sys.argv[3])
print(json.dumps({
    "scorer_compute": sorted({layer.compute_dtype for layer in scorer.layers}),
    "scorer_difference": float(np.abs(scorer.predict(digits.images[:16], verbose=0) - probabilities).max()),
    "policy": keras.mixed_precision.global_policy().name,
    "hidden_compute": [layer.compute_dtype for layer in cnn.layers if layer.name.startswith(("conv2d", "dense"))],
    "output_dtype": cnn.layers[-1].compute_dtype,
    "optimizer": type(model.optimizer).__name__,
    "losses": history.history["loss"],
    "probabilities_dtype": str(probabilities.dtype),
    "sums": probabilities.sum(axis=1).round(3).tolist(),
}))
"""


@pytest.mark.parametrize(
    "policy, compute, optimizer",
    [
        # float16 needs loss scaling, around the optimizer that keeps the weight average; bfloat16
        # has float32's range and needs none
        ("mixed_float16", "float16", "LossScaleOptimizer"),
        ("mixed_bfloat16", "bfloat16", "AveragingAdam"),
    ],
)
def test_mixed_precision_computes_in_16_bits_with_a_float32_softmax(kaggle_dir, tmp_path, policy, compute, optimizer):
    # The policy's wiring is the subject, on any CPU: the probe reads a bfloat16 CPU's flags, and
    # trains only dense layers, whose bfloat16 kernels run without those instructions too (the
    # refusal itself is tested below).
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MIXED_PRECISION_PROBE,
            str(kaggle_dir / "train.csv"),
            policy,
            str(tmp_path / "model.keras"),
            str(cpuinfo),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["policy"] == policy
    assert probe["hidden_compute"] == [compute] * 3
    assert probe["output_dtype"] == "float32" and probe["probabilities_dtype"] == "float32"
    assert probe["optimizer"].startswith(optimizer)
    # Loaded for scoring, the same weights compute in float32 (16 bits is slow, or fails, on
    # some CPUs), giving the probabilities the 16-bit model gave, up to its rounding.
    assert probe["scorer_compute"] == ["float32"]
    assert probe["scorer_difference"] < 0.05
    assert probe["losses"][1] < probe["losses"][0]
    assert all(abs(total - 1.0) < 1e-2 for total in probe["sums"])


@pytest.mark.parametrize(
    "cpuinfo, supported",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n", True),  # AMD Zen 4
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma amx_bf16 amx_tile\n", True),  # Intel Sapphire Rapids
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\n", False),  # AVX-512 without bfloat16
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
        ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
        ("", None),  # cannot tell: let it run
    ],
)
def test_bfloat16_support_is_read_from_cpuinfo(cpuinfo, supported):
    assert cpu_has_bfloat16(cpuinfo) is supported


REFUSING_CPU = """
import sys
from digit_models import cli
from digit_models.runtime import cpu_features
cpu_features.CPUINFO = sys.argv[1]
sys.exit(cli.main(sys.argv[2:]))
"""


def test_bfloat16_on_a_cpu_without_it_is_refused_before_ray_starts(tmp_path, kaggle_dir):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")  # an AVX2-only machine's
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            REFUSING_CPU,
            str(cpuinfo),
            "train",
            "--data",
            str(kaggle_dir),
            "--out",
            str(out),
            "--model",
            "dense",
            "--epochs",
            "1",
            "--limit",
            "500",
            "--precision",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("digits: error: --precision bfloat16: the CPU of ") and "no bfloat16 instructions" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "mixed, gpus, precision", [(True, 0.0, "bfloat16"), (True, 1.0, "auto"), (False, 0.0, "float32")]
)
def test_a_run_started_before_precision_was_an_option_resumes_in_the_precision_it_began_in(mixed, gpus, precision):
    """started.json of a run begun with --mixed-precision (16 bits: float16 on GPUs, which
    `auto` picks there, bfloat16 on CPUs) or without it (float32)."""
    saved = {**asdict(TrainConfig(gpus_per_worker=gpus)), "mixed_precision": mixed}
    del saved["precision"]
    assert TrainConfig(**_precision_named(saved)).precision == precision

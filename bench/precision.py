"""`python -m bench.precision`: what `--precision bfloat16` (bfloat16 compute on CPU workers,
what `auto` picks on CPUs that have it) does to training speed on this machine's CPUs, against
`--precision float32`: the `best` preset's CNN with 1 worker and every CPU, and the `fast`
preset's (the seed's CNN at batch 128), side by side (bench/paired.py). Needs a CPU with bfloat16
instructions (AVX512-BF16, AMX or Arm BF16): `digits train` refuses `--precision bfloat16` on
others."""

from __future__ import annotations

from bench.paired import BEST_ONE_WORKER, Variant, main

SETUPS = {
    BEST_ONE_WORKER[0]: BEST_ONE_WORKER[1],
    "cnn@128, 1 worker x 2 CPUs (`--preset fast`)": [
        "--preset",
        "fast",
        "--workers",
        "1",
        "--val-fraction",
        "0",
        "--target-metric",
        "accuracy",
        "--target",
        "1.0",
    ],
}


def computing_in(policy: str, options: list[str]) -> Variant:
    def check(run: dict) -> str | None:
        ran = run["worker_process"]["precision"]
        return None if ran == policy else f"asked for {policy}, the worker computed in {ran}"

    return Variant(policy, options=options, check=check)


# float32 against bfloat16, each checked to be what the workers computed in (bench/precision_accuracy.py
# compares the same two).
VARIANTS = (
    computing_in("float32", ["--precision", "float32"]),
    computing_in("mixed_bfloat16", ["--precision", "bfloat16"]),
)

if __name__ == "__main__":
    main(
        "python -m bench.precision",
        __doc__.splitlines()[0],
        SETUPS,
        VARIANTS,
    )

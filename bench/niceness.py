"""`python -m bench.niceness`: what Ray's default worker niceness (15) costs training, against
the niceness 0 that our processes ask for (RAY_worker_niceness, digit_models/__init__.py): the
`best` preset's CNN with 1 worker and every CPU, and the seed's CNN with 2 workers x 1 CPU,
each at 15 and at 0, side by side (bench/paired.py)."""

from __future__ import annotations

from bench.paired import BEST_ONE_WORKER, Variant, main

SETUPS = {
    BEST_ONE_WORKER[0]: BEST_ONE_WORKER[1],
    "cnn@32, 2 workers x 1 CPU": [
        "--model",
        "cnn",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--batch-size",
        "32",
        "--val-fraction",
        "0",
        "--target",
        "1.0",
    ],
}


def at_niceness(nice: int) -> Variant:
    def check(run: dict) -> str | None:
        ran_at = run["worker_process"]["niceness"]
        return None if ran_at == nice else f"asked for niceness {nice}, the worker ran at {ran_at}"

    return Variant(f"niceness {nice}", env={"RAY_worker_niceness": str(nice)}, check=check)


if __name__ == "__main__":
    main("python -m bench.niceness", __doc__.splitlines()[0], SETUPS, (at_niceness(15), at_niceness(0)))

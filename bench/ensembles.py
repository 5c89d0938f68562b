"""`python -m bench.ensembles RUN_DIR RUN_DIR ...`: how accuracy grows with the number of
models averaged. Each run's model scores the held-out images once (probabilities averaged over
--tta test-time views, as `digits predict --tta`); then, for each ensemble size, random draws
of that many of the runs are averaged and scored: mean, min and max right answers. Held out:
the official MNIST test images of test.csv, its other rows (MNIST training images train.csv
left out), and the validation rows when every run held out the same ones. A report, not a way
to choose: choose on the validation or held-out training rows, never the official ones.

    python -m bench.ensembles runs/a runs/b runs/c ... [--data data] [--tta 8] [--draws 40]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ensembles", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data", default="data")
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--draws", type=int, default=40, help="random ensembles per size")
    args = parser.parse_args()

    from bench.heldout import labelled_sets, probabilities
    from digit_models.nets.models import load_model_file
    from digit_models.storage.run_dir import RunDir
    from digit_models.runtime.tf_setup import configure_tensorflow

    configure_tensorflow(cpus=2)
    configs = [json.loads(Path(run, RunDir.RUN).read_text())["config"] for run in args.runs]
    split = {(c["val_fraction"], c["seed"], c["limit"]) for c in configs}
    sets = labelled_sets(args.data, configs[0] if len(split) == 1 else None)
    predicted = {name: [] for name in sets}
    for run in args.runs:
        model = load_model_file(str(Path(run, RunDir.MODEL)))
        for name, (images, _) in sets.items():
            predicted[name].append(probabilities(model, images, args.tta))

    draw = random.Random(0)
    result = {"runs": args.runs, "tta": args.tta}
    for name, (_, truth) in sets.items():

        def right(members, name=name, truth=truth) -> int:
            return int((sum(predicted[name][m] for m in members).argmax(axis=1) == truth).sum())

        wrong = [set(np.flatnonzero(p.argmax(axis=1) != truth)) for p in predicted[name]]
        sizes = {}
        for size in range(1, len(args.runs) + 1):
            counts = [right(draw.sample(range(len(args.runs)), size)) for _ in range(args.draws)]
            sizes[size] = {"mean": round(float(np.mean(counts)), 2), "min": min(counts), "max": max(counts)}
        result[name] = {
            "images": len(truth),
            "models": [right([m]) for m in range(len(args.runs))],
            "ensemble_sizes": sizes,
            "wrong_in_every_model": len(set.intersection(*wrong)),
            "wrong_in_some_model": len(set.union(*wrong)),
        }
        print(f"{name} ({len(truth):,} images), right answers by ensemble size (of {args.draws} random draws):")
        for size, row in sizes.items():
            print(f"  {size:>2}: mean {row['mean']:,.2f}  min {row['min']:,}  max {row['max']:,}")
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    main()

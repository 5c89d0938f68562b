"""`python -m bench`: the benchmarks in one run on this machine, reported as ratios.

Absolute speeds on a shared machine drift from minute to minute, so every headline compares two
things measured side by side in the same invocation, repeats interleaved (a, b, c, a, b, c) so
that drift hits both sides alike. Each configuration runs in a fresh process, as a user runs it.

Writes bench/results/<date>.json (every number), bench/results/<date>.png (the chart) and
BENCHMARKS.md (the table, replaced each run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    ceilings,
    footprint,
    machine,
    precision_accuracy,
    report,
    scoring,
    serving,
    training,
    training_input,
)
from bench.processes import REPO, Processes

SECTIONS = ("training", "ceilings", "scoring", "serving", "footprint", "training_input", "precision")
# A quick run's scoring input: the first QUICK_TEST_ROWS rows of test.csv, repeated to
# QUICK_SCALE images for its one scale size (so that the repeating is exercised too).
QUICK_TEST_ROWS, QUICK_SCALE = 200, 500


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"), help="folder from `digits data` (made there if missing)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per throughput run (>= 2)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each run")
    parser.add_argument(
        "--scale",
        type=int,
        nargs="+",
        default=[28_000, 280_000, 2_800_000],
        metavar="IMAGES",
        help="input sizes of the scoring scale runs",
    )
    parser.add_argument(
        "--input-scale",
        type=int,
        nargs="+",
        default=[1, 10, 100],
        metavar="TIMES",
        help="train.csv repeated this many times for the training input runs",
    )
    parser.add_argument(
        "--serve-requests",
        type=int,
        default=5000,
        metavar="N",
        help="requests per load of the serving section (each load also ends after 60 s)",
    )
    parser.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument(
        "--update",
        metavar="RESULTS_JSON",
        help="measure only --sections again; keep the other sections' numbers "
        "from this earlier results file (the report says which and when)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run on a small slice: every step, meaningless numbers"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up")

    started = time.time()
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="digits-bench-") as scratch:
        run = Processes(Path(scratch))
        if not (data / "train.csv").exists():
            run.digits("data", "--out", str(data))
        results = {
            "date": datetime.date.today().isoformat(),
            "quick": args.quick,
            "sections": args.sections,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "cpu_flags": machine.cpu_flags(),
                "load_average": os.getloadavg(),  # at the start: the machine may be shared
            },
            "settings": {"epochs": args.epochs, "repeats": args.repeats},
            "arithmetic": run.arithmetic(),
        }
        trainer = training.Trainer(run, data, limit=1500 if args.quick else None)
        test_csv = _test_csv(data, run.scratch, args.quick)
        if "training" in args.sections:
            setups = [("dense", 32, 1)] if args.quick else [("cnn", 32, 1), ("cnn", 32, 2), ("cnn", 128, 1)]
            results["training"] = {
                "weak_scaling": training.weak_scaling(trainer, setups, args.epochs, args.repeats),
                "overhead": training.overhead(
                    trainer, ["dense"] if args.quick else ["dense", "cnn"], args.epochs, args.repeats
                ),
                "time_to_99": training.time_to_accuracy(trainer, args.quick, args.repeats),
                "step_parts": training.step_parts(run, args.quick),
            }
            if not args.quick:  # a cluster of its own: not beside the test suite's Ray
                results["training"]["two_node_cluster"] = training.two_node_cluster(trainer)
        if "ceilings" in args.sections:
            results["ceilings"] = ceilings.measure(
                run,
                data,
                model="dense" if args.quick else "cnn",
                batches=[32] if args.quick else [32, 128],
                rows=1500 if args.quick else 16_000,
                epochs=args.epochs,
                repeats=args.repeats,
            )
        if "scoring" in args.sections:
            model = "dense" if args.quick else "cnn"
            # A quick run scores with a dense net its training section trained, if it ran.
            run_dir = trainer.latest("dense") if args.quick else None
            if run_dir is None:
                _, _, run_dir = trainer.train("--model", model, "--epochs", "2" if not args.quick else "1")
            sizes = [QUICK_SCALE] if args.quick else args.scale
            results["scoring"] = {
                "model": model,
                "fixed_cost": scoring.fixed_cost(run, run_dir / "model.keras", test_csv, args.repeats),
                "scale": scoring.scale(
                    run, run_dir / "model.keras", test_csv, sizes, actors=[1] if args.quick else [1, 2]
                ),
            }
            if not args.quick:  # a cluster of its own: not beside the test suite's Ray
                results["scoring"]["two_node_cluster"] = scoring.two_node_cluster(run, run_dir, test_csv)
        if "training_input" in args.sections:
            results["training_input"] = training_input.scale(
                data / "train.csv", run.scratch, [1] if args.quick else args.input_scale
            )
        if "footprint" in args.sections:
            results["footprint"] = _footprint(data, test_csv, run.scratch, args, results.get("training_input"))
        if "serving" in args.sections:
            model = "dense" if args.quick else "cnn"
            run_dir = trainer.latest(model)
            if run_dir is None:
                _, _, run_dir = trainer.train("--model", model, "--epochs", "1" if args.quick else "2")
            results["serving"] = {
                "model": model,
                **serving.load_test(
                    run_dir,
                    test_csv,
                    requests=100 if args.quick else args.serve_requests,
                    seconds=5 if args.quick else 60,
                    repeats=args.repeats,
                    scratch=run.scratch,
                ),
            }
        if "precision" in args.sections:
            results["precision"] = precision_accuracy.compare(trainer, data, [0] if args.quick else [0, 1, 2])
    if args.update:
        _keep_other_sections(results, Path(args.update))
    results["ratios"] = report.ratios(results)
    results["wall_s"] = round(time.time() - started, 1)
    _write(results, Path(args.results_dir), Path(args.markdown))


def _footprint(data: Path, test_csv: Path, scratch: Path, args, sizes: list[dict] | None) -> dict:
    """Ray's own processes' CPU during a 1-worker training (the seed CNN, every CPU) and a
    scoring of test.csv by its model, each on an embedded Ray. A quick run takes the training
    input section's run, if it ran (a dense net's epoch on the slice), for the training: one
    embedded Ray fewer in the smoke test."""
    if args.quick and sizes:
        trained = footprint.summary([sizes[0]["footprint"]["runs"][0]])
    else:
        quick = ["--model", "dense", "--epochs", "1", "--limit", "1500"]
        model = ["--model", "cnn", "--epochs", str(args.epochs)]
        fixed = ["--val-fraction", "0", "--target", "1.0"]
        trained = footprint.training(data, scratch, args.repeats, [*(quick if args.quick else model), *fixed])
    run_dir = Path(trained["runs"][-1]["run_dir"])
    return {"training": trained, "scoring": footprint.scoring(run_dir, test_csv, scratch, args.repeats)}


def _keep_other_sections(results: dict, earlier_file: Path) -> None:
    earlier = json.loads(earlier_file.read_text())
    kept = [name for name in SECTIONS if name not in results["sections"] and name in earlier]
    for name in kept:
        results[name] = earlier[name]
    # A section the earlier run had itself kept from a run before it keeps that run's date and peak.
    groups = []
    for group in report.kept_groups(earlier):
        still_kept = [name for name in group["sections"] if name in kept]
        if still_kept:
            groups.append({**group, "sections": still_kept})
    inherited = {name for group in groups for name in group["sections"]}
    own = [name for name in kept if name not in inherited]
    if own:
        measured = {
            "date": earlier["date"],
            "wall_s": earlier["wall_s"],
            "peak_gflops": earlier["arithmetic"]["peak_gflops"],
            "cpu_flags": earlier.get("machine", {}).get("cpu_flags"),
        }
        groups.insert(0, {"sections": own, **measured})
    results["kept"] = groups
    results["sections"] = [name for name in SECTIONS if name in results]


def _test_csv(data: Path, scratch: Path, quick: bool) -> Path:
    if not quick:
        return data / "test.csv"
    small = scratch / "test.csv"  # a small test set of real rows (and the header)
    with open(data / "test.csv") as full, open(small, "w") as target:
        target.writelines(line for _, line in zip(range(QUICK_TEST_ROWS + 1), full))
    return small


def _write(results: dict, results_dir: Path, markdown: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / results["date"]
    _atomic_write(stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    chart = stem.with_suffix(".png")
    report.chart(results, chart)
    _atomic_write(markdown, report.markdown(results, os.path.relpath(chart, markdown.parent)))
    print(markdown.read_text())


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())

"""The `digits` command: a thin shell over the library.

Exit status: 0 done, 2 bad input or usage (one line on stderr, a traceback only with --debug),
1 an unexpected failure, 130 after Ctrl-C, 143 after SIGTERM (runtime/interrupts.py). A reader
that stops reading stdout (`digits evaluate ... | head -2`) ends the output quietly and leaves
the status the command's own, as the work it reports on is done by then.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

import digit_models  # noqa: F401  (sets the environment TensorFlow and Ray workers need)
from digit_models.errors import DigitsError, WorkersUnavailable, first_line
from digit_models.runtime.interrupts import EXIT_STATUS, MESSAGE, exit_now, interruption_kind, sigterm_raises


def _add_ray_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster (e.g. ray://host:10001 or auto); "
        "default: start an embedded local Ray for this command",
    )


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with usage errors as our other errors: one line, `digits: error: ...`
    (raised as DigitsError, which main() prints), where argparse prints its usage block first."""

    def error(self, message: str):
        command = self.prog.removeprefix("digits").strip()
        raise DigitsError(message + (f" (see `digits {command} --help`)" if command else ""))


def _add_preset(parser: argparse.ArgumentParser, meaning: str) -> None:
    from digit_models.config import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help=meaning)


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="DIR_OR_CSV", help="folder with train.csv (from `digits data`), or a train.csv path or URI"
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of a training run that `digits train` and `digits tune` share. Defaults of
    None mark the options a user left out, which a preset then fills."""
    from digit_models.config import (
        ALL_REDUCE_DTYPES,
        KEEP_CHOICES,
        LR_SCHEDULES,
        PRECISIONS,
        TARGET_METRICS,
        TrainConfig,
    )

    defaults = TrainConfig()
    option = parser.add_argument
    option("--model", help=f"registered model: the seed's dense and cnn, or deep_cnn (default {defaults.model})")
    option(
        "--min-workers",
        type=int,
        metavar="MIN",
        help="elastic: go on with as few as MIN workers when nodes are lost, and grow back to "
        "--workers when they return (default: --workers, a fixed size)",
    )
    option(
        "--wait-for-workers",
        type=float,
        metavar="SECONDS",
        help="how long a run with fewer than --min-workers workers waits for nodes before "
        f"it ends, resumable (default {defaults.wait_for_workers:.0f})",
    )
    option("--epochs", type=int, help=f"maximum epochs (default {defaults.epochs})")
    option("--batch-size", type=int, help=f"per-worker batch (default {defaults.batch_size})")
    option(
        "--accumulate",
        type=int,
        metavar="K",
        help="sum the gradients of K batches before each update and all-reduce: K times fewer "
        f"all-reduces, K times the batch per update (default {defaults.accumulate})",
    )
    option(
        "--sync-every",
        type=int,
        metavar="K",
        help="each worker updates its own weights K batches in a row, then the workers average "
        f"their weights: one all-reduce per K batches, the batch per update kept (default "
        f"{defaults.sync_every}: the gradients summed every batch)",
    )
    option(
        "--all-reduce-dtype",
        choices=ALL_REDUCE_DTYPES,
        help="what the gradients are summed across workers in (default bfloat16 between CPU "
        "workers, float32 between GPUs; the weights stay float32)",
    )
    option("--learning-rate", type=float, help=f"default {defaults.learning_rate}")
    option(
        "--scale-learning-rate",
        action="store_true",
        default=None,
        help="multiply the rate by the square root of workers x --accumulate (the presets do; not with --sync-every)",
    )
    option(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="constant, or cosine: a warm-up (one epoch, at most a tenth of the run) then "
        "cosine decay to 0 (default constant)",
    )
    option(
        "--augment",
        action="store_true",
        default=None,
        help="random small rotations, shifts and zooms of the training images",
    )
    option("--label-smoothing", type=float, help="default 0")
    option(
        "--dropout",
        type=float,
        metavar="RATE",
        help="the rate of the model's dropout layers (deep_cnn's; default: the model's own, 0.4)",
    )
    option(
        "--weight-average",
        type=float,
        metavar="MOMENTUM",
        help="validate, checkpoint and keep an exponential moving average of the weights, "
        "updated every step with this momentum, e.g. 0.999 (default 0: the weights themselves)",
    )
    option(
        "--recompute-batchnorm",
        action="store_true",
        default=None,
        help="before each validation and checkpoint, recompute BatchNorm's statistics from "
        "un-augmented training images with dropout off, as the model will predict",
    )
    option("--target", type=float, help=f"stop once the target metric reaches this (default {defaults.target})")
    option("--target-metric", choices=TARGET_METRICS, help=f"default {defaults.target_metric}")
    option("--val-fraction", type=float, help=f"seeded validation split (default {defaults.val_fraction})")
    option(
        "--keep",
        choices=KEEP_CHOICES,
        help="model.keras: the epoch with the best val_accuracy, or the last epoch (default "
        f"{defaults.keep}; without a validation split, the last)",
    )
    option("--seed", type=int, help=f"default {defaults.seed}")
    option("--limit", type=int, metavar="ROWS", help="use only the first ROWS rows of train.csv")
    option("--cpus-per-worker", type=int, help="default: the cluster's CPUs split between the workers")
    option("--gpus-per-worker", type=float, help="default 0")
    option(
        "--precision",
        choices=PRECISIONS,
        help="what the layers compute in (the weights and softmax stay float32): auto is bfloat16 "
        "on CPUs with bfloat16 instructions (AVX512-BF16, AMX, Arm BF16), float16 on GPU "
        "workers and float32 elsewhere; bfloat16 is refused on a CPU without them (default "
        f"{defaults.precision})",
    )
    option(
        "--max-failures",
        type=int,
        help=f"worker-group restarts allowed before the run fails (default {defaults.max_failures})",
    )
    option(
        "--max-preemptions",
        type=int,
        help="restarts allowed after nodes are preempted (counted apart from --max-failures; "
        f"default {defaults.max_preemptions})",
    )
    option(
        "--mlflow",
        metavar="TRACKING_URI",
        help="also log the run to MLflow (e.g. file:///abs/path/mlruns or http://host:5000); needs the mlflow extra",
    )
    option(
        "--profile-steps",
        type=_step_range,
        metavar="FIRST:LAST",
        help="trace these training steps (counted from 1 across epochs) with TensorFlow's profiler "
        "on every worker, for TensorBoard's Profile tab (tensorboard/plugins/profile/ in the run)",
    )


def _step_range(text: str) -> list[int]:
    first, colon, last = text.partition(":")
    if not (colon and first.isdigit() and last.isdigit()):
        raise argparse.ArgumentTypeError(f"{text}: expected FIRST:LAST, two step numbers")
    return [int(first), int(last)]


def build_parser() -> argparse.ArgumentParser:
    from digit_models.config import EXPORT_FORMATS, PredictConfig, ServeConfig, TrainConfig

    # --debug before the command or after it: the command's own copy leaves the value alone
    # unless given (SUPPRESS), so that `digits --debug evaluate ...` keeps it too.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser = _Parser(prog="digits", description="Kaggle Digit Recognizer: data, distributed training, scoring.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"digits {digit_models.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[debug], **options)

    data = command("data", help="build Kaggle-format files from real MNIST")
    data.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write the files into: new, empty, or an earlier `digits data` output",
    )
    data.add_argument(
        "--force",
        action="store_true",
        help="write into a folder that holds other files too, replacing only the "
        "files of the names `digits data` writes",
    )
    data.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")

    train = command(
        "train",
        help="train a model on Ray Train",
        description="Options left out take the --preset's value, else the default shown.",
    )
    _add_preset(
        train,
        "fast: 99%% held-out accuracy soonest (the seed's cnn, 3 epochs); best: the "
        "highest accuracy of one run (deep_cnn, 30 epochs); their times and accuracy by "
        'machine: the README\'s "Presets and accuracy"',
    )
    _add_data(train)
    train.add_argument("--out", metavar="RUN_DIR", help="new run directory")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this unfinished run from its last checkpoint, with its own "
        "settings (instead of --data/--out and the options below)",
    )
    train.add_argument("--workers", type=int, help=f"Ray Train workers (default {TrainConfig().workers})")
    _add_run_options(train)
    train.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="finish within this many minutes: after each epoch of the plan's first half "
        "(the first three at least), the epochs (at most --epochs) are sized to fit, "
        "and the learning-rate schedule with them",
    )
    train.add_argument(
        "--scoring-reserve",
        type=int,
        metavar="IMAGES",
        help="keep time in --time-budget for scoring this many images with the model "
        "afterwards (test rows x (1 + --tta)), estimated from the measured training speed",
    )
    _add_ray_address(train)

    search = command(
        "tune",
        help="search training options on Ray Tune, stopping weak trials early",
        description="Every trial is a `digits train` run in TUNE_DIR/trials/; `digits train` options "
        "given here are the same for every trial (left out of the search space).",
    )
    _add_preset(
        search,
        "the trials' settings start from this preset's, and its default search "
        "space is searched unless --space is given",
    )
    _add_data(search)
    search.add_argument("--out", metavar="TUNE_DIR", help="new folder for the search")
    search.add_argument("--resume", metavar="TUNE_DIR", help="continue this interrupted search with its own settings")
    search.add_argument("--trials", type=int, help="trials to run (required for a new search)")
    search.add_argument(
        "--space",
        metavar="FILE",
        help="YAML or JSON: `digits train` option names, each a list of values or "
        "{min: A, max: B} (log: true for a log scale); default: the preset's space",
    )
    search.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        metavar="W",
        help="Ray Train workers of each trial (default 1); as many trials run at once as the cluster's CPUs hold",
    )
    search.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="end the whole search after this many minutes (running trials stop)",
    )
    search.add_argument(
        "--search-seed",
        type=int,
        default=0,
        help="seed of the searcher's samples (default 0; --seed is the trials' own)",
    )
    _add_run_options(search)
    _add_ray_address(search)

    scoring = PredictConfig(runs=[], input="", out="")  # the defaults
    predict = command("predict", help="score a test set on Ray Data")
    predict.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="RUN_DIR",
        help="trained run directory; repeat to average several models",
    )
    predict.add_argument(
        "--input",
        required=True,
        metavar="TEST",
        help="Kaggle test.csv (.csv, .csv.gz) or Parquet, a folder of them or a glob; a path or URI",
    )
    predict.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="output folder: predictions/ (Parquet), submission.csv, predict.json",
    )
    predict.add_argument(
        "--batch-size",
        type=int,
        default=scoring.batch_size,
        help=f"images per model call (default {scoring.batch_size})",
    )
    predict.add_argument(
        "--actors",
        type=int,
        default=scoring.actors,
        help="concurrent scoring actors (default: one for the Kaggle test set, "
        "more for inputs of more than about half a million images, up to one "
        "per CPU)",
    )
    predict.add_argument(
        "--cpus-per-actor",
        type=int,
        default=scoring.cpus_per_actor,
        help="default: the cluster's CPUs split between the actors",
    )
    predict.add_argument(
        "--gpus-per-actor", type=float, default=scoring.gpus_per_actor, help=f"default {scoring.gpus_per_actor:g}"
    )
    predict.add_argument(
        "--tta",
        type=int,
        default=scoring.tta,
        metavar="VIEWS",
        help="test-time augmentation: also average over this many fixed "
        "shifted, rotated and zoomed views of each image, besides the image "
        f"itself (0-8; default {scoring.tta})",
    )
    _add_ray_address(predict)

    evaluate = command("evaluate", help="accuracy of predictions against true labels")
    evaluate.add_argument(
        "--predictions",
        required=True,
        metavar="OUT_DIR_OR_CSV",
        help="a `digits predict` output folder, or a submission.csv",
    )
    evaluate.add_argument(
        "--labels", required=True, metavar="CSV", help="true labels, ImageId,Label (test_labels.csv from `digits data`)"
    )
    evaluate.add_argument(
        "--origin",
        default=None,
        metavar="CSV",
        help="test_origin.csv, to report the official MNIST test images "
        "separately (default: beside --labels, if there)",
    )
    evaluate.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="where to write the numbers (default: evaluation.json in the "
        "predictions folder, or beside the submission.csv)",
    )

    report = command(
        "report", help="training curves, confusion matrix and the most confident mistakes as PNGs and one HTML page"
    )
    report.add_argument("--run", metavar="RUN_DIR", help="a finished training run (required)")
    # `digits report RUN_DIR`, as before --run: still taken, for the scripts written so.
    report.add_argument("run_given_first", nargs="?", metavar="RUN_DIR", help=argparse.SUPPRESS)
    report.add_argument(
        "--predictions", default=None, metavar="OUT_DIR", help="a `digits predict` output folder (needs --labels)"
    )
    report.add_argument(
        "--labels", default=None, metavar="CSV", help="true labels of the scored images (test_labels.csv)"
    )
    report.add_argument("--out", required=True, metavar="REPORT_DIR", help="new folder to write")

    export = command(
        "export", help="a trained model for serving: a TensorFlow SavedModel (TensorFlow Serving) or TFLite"
    )
    export.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished training run")
    export.add_argument(
        "--format",
        default="savedmodel",
        help=f"{' or '.join(EXPORT_FORMATS)}: OUT/1/ (the layout TensorFlow "
        "Serving loads) or OUT/model.tflite (default savedmodel)",
    )
    export.add_argument("--out", required=True, metavar="OUT_DIR", help="new folder to write")

    served = ServeConfig(runs=[])  # the defaults
    server = command(
        "serve",
        help="serve trained runs over HTTP on Ray Serve, with a page to draw a digit on",
        description="Runs until Ctrl-C or SIGTERM, which let the requests in flight finish. "
        "POST /predict (JSON), POST /predict.csv (Kaggle CSV), GET /health, GET /model, and the page at /.",
    )
    which = server.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--run", action="append", metavar="RUN_DIR", help="trained run directory; repeat to average several models"
    )
    which.add_argument(
        "--swap",
        action="append",
        metavar="RUN_DIR",
        help="switch the server running on the cluster at --address to this run (repeat for an "
        "ensemble; with this --tta and --replicas) without dropping requests, then return",
    )
    server.add_argument(
        "--tta",
        type=int,
        default=served.tta,
        metavar="VIEWS",
        help=f"test-time augmentation, as in `digits predict` (default {served.tta})",
    )
    server.add_argument("--replicas", type=int, default=served.replicas, help=f"default {served.replicas}")
    server.add_argument("--port", type=int, default=served.port, help=f"HTTP port on 127.0.0.1 (default {served.port})")
    server.add_argument(
        "--cpus-per-replica", type=float, default=served.cpus_per_replica, help=f"default {served.cpus_per_replica:g}"
    )
    server.add_argument(
        "--gpus-per-replica", type=float, default=served.gpus_per_replica, help=f"default {served.gpus_per_replica:g}"
    )
    server.add_argument(
        "--max-batch-size",
        type=int,
        default=served.max_batch_size,
        metavar="REQUESTS",
        help=f"a replica's model call takes at most this many requests' images (default {served.max_batch_size})",
    )
    server.add_argument(
        "--batch-wait-ms",
        type=float,
        default=1000 * served.batch_wait_s,
        metavar="MS",
        help="how long a batch's first request waits for more before the model call "
        f"(default {1000 * served.batch_wait_s:g})",
    )
    _add_ray_address(server)

    runs = command("runs", help="list the training runs in a folder: model, epochs, best val_accuracy, state")
    runs.add_argument(
        "dir",
        nargs="?",
        default=".",
        metavar="DIR",
        help="the folder holding the run directories, a path or URI (default: the current directory)",
    )
    runs.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    return parser


def run_data(args) -> None:
    from digit_models.storage.data import build_kaggle_files, require_data_folder
    from digit_models.storage.mnist_source import load_mnist

    require_data_folder(args.out, force=args.force)  # before the download
    manifest = build_kaggle_files(load_mnist(), args.out, seed=args.seed, force=args.force)
    print(
        f"wrote {manifest['train_rows']:,} training and {manifest['test_rows']:,} test rows "
        f"({manifest['official_test_rows_in_test_csv']:,} from the official MNIST test set) "
        f"to {args.out}"
    )


def run_train(args) -> None:
    from digit_models.training.driver import resume, train

    if args.resume:
        if args.data or args.out or args.preset:
            raise DigitsError(
                "--resume continues a run with its own settings; give it without --data, --out and --preset"
            )
        summary = resume(args.resume, address=args.address)
        args.out = args.resume
    elif not (args.data and args.out):
        raise DigitsError("train needs --data and --out (or --resume RUN_DIR)")
    else:
        summary = train(_train_config(args), address=args.address)
    last, kept = summary["history"][-1], summary["model_epoch"]
    model = f"model of epoch {kept} (best val_accuracy)" if kept != last["epoch"] else "model"
    print(
        f"{summary['stop_reason']}: {summary['epochs_run']} epochs, "
        + ", ".join(f"{k} {last[k]:.4f}" for k in ("accuracy", "val_accuracy") if k in last)
        + f"; {model} in {args.out}"
    )


def _train_config(args):
    from digit_models.config import TrainConfig

    return TrainConfig.from_preset(args.preset, **_run_options_given(args))


def _run_options_given(args) -> dict:
    """The TrainConfig fields given on the command line."""
    from dataclasses import fields

    from digit_models.config import TrainConfig

    return {
        field.name: getattr(args, field.name)
        for field in fields(TrainConfig)
        if field.name != "preset" and getattr(args, field.name, None) is not None
    }


def run_tune(args) -> None:
    from digit_models.config import SearchConfig
    from digit_models.tuning.search import resume, tune

    if args.resume:
        if (
            args.data
            or args.out
            or args.preset
            or args.trials
            or args.space
            or args.time_budget
            or _run_options_given(args)
        ):
            raise DigitsError(
                "--resume continues a search with its own settings; give it without "
                "--data, --out, --trials, --preset, --space, --time-budget and the "
                "`digits train` options"
            )
        summary = resume(args.resume, address=args.address)
        args.out = args.resume
    elif not (args.data and args.out and args.trials):
        raise DigitsError("tune needs --data, --out and --trials (or --resume TUNE_DIR)")
    else:
        fixed = {
            name: value
            for name, value in _run_options_given(args).items()
            if name not in ("time_budget", "data", "out")
        }  # the search's own, not a trial's
        summary = tune(
            SearchConfig(
                data=args.data,
                out=args.out,
                trials=args.trials,
                preset=args.preset,
                space_file=args.space,
                fixed=fixed,
                workers_per_trial=args.workers_per_trial,
                time_budget=args.time_budget,
                search_seed=args.search_seed,
            ),
            address=args.address,
        )
    states = ", ".join(f"{count} {state}" for state, count in sorted(summary["states"].items()))
    best = summary["best"]
    ran, asked = summary["ran"], summary["trials"]
    print(
        f"{ran} trials"
        + (f" of {asked} (the time budget ran out)" if ran < asked else "")
        + f": {states}"
        + (
            f"; best: trial {best['trial']}, val_accuracy {best['val_accuracy']:.4f}, model in {best['run_dir']}"
            if best
            else "; no trial finished"
        )
    )
    if best:
        print(f"train it again: {best['command']}")


def run_predict(args) -> None:
    from dataclasses import fields

    from digit_models.config import PredictConfig
    from digit_models.storage.files import Folder
    from digit_models.scoring.predict import SUBMISSION_FILE, predict

    options = {field.name: getattr(args, field.name) for field in fields(PredictConfig) if field.name != "runs"}
    summary = predict(PredictConfig(runs=args.run, **options), address=args.address)
    print(
        f"scored {summary['images']:,} images ({summary['images_per_s']:,.0f} images/s); "
        f"submission: {Folder(args.out).child(SUBMISSION_FILE)}"
    )


def run_evaluate(args) -> None:
    from digit_models.scoring.evaluation import evaluate, format_report, write_evaluation
    from digit_models.storage.files import Folder, parent_and_name
    from digit_models.scoring.predict import EVALUATION_FILE

    result = evaluate(args.predictions, args.labels, origin=args.origin)
    predictions = Folder(args.predictions)
    target = args.json or (
        predictions.child(EVALUATION_FILE)
        if predictions.is_folder()
        else Folder(parent_and_name(args.predictions)[0]).child(EVALUATION_FILE)
    )
    write_evaluation(result, target)
    print(format_report(result))
    print(f"written to {target}")


def run_report(args) -> None:
    from digit_models.scoring.report import write_report

    if args.run and args.run_given_first:
        raise DigitsError(f"report: two runs given ({args.run_given_first} and --run {args.run}); a report is on one")
    run = args.run or args.run_given_first
    if not run:
        raise DigitsError("the following arguments are required: --run (see `digits report --help`)")
    written = write_report(run, args.out, predictions=args.predictions, labels=args.labels)
    print(f"wrote {', '.join(written)} to {args.out}")


def run_export(args) -> None:
    from digit_models.nets.export import export

    print(f"wrote {export(args.run, args.out, args.format)}")


def run_serve(args) -> None:
    import time

    from digit_models.config import ServeConfig
    from digit_models.serving.server import serving, swap

    config = ServeConfig(
        runs=args.swap or args.run,
        tta=args.tta,
        replicas=args.replicas,
        port=args.port,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
    )
    if args.swap:
        swap(config, address=args.address)
        print(f"swapped: the server now answers with {', '.join(config.runs)}")
        return
    with serving(config, address=args.address) as url:
        print(f"serving {', '.join(config.runs)} at {url} (Ctrl-C or SIGTERM stops)", flush=True)
        while True:  # until the interrupt, which ends the block and stops the server
            time.sleep(3600)


def run_runs(args) -> None:
    import json

    from digit_models.training.runs import format_runs, list_runs

    found = list_runs(args.dir)
    print(json.dumps(found, indent=2) if args.json else format_runs(found))


COMMANDS = {
    "data": run_data,
    "train": run_train,
    "tune": run_tune,
    "predict": run_predict,
    "evaluate": run_evaluate,
    "report": run_report,
    "export": run_export,
    "runs": run_runs,
    "serve": run_serve,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except DigitsError as exc:  # a usage error (_Parser)
        print(f"digits: error: {exc}", file=sys.stderr)
        return 2
    try:
        with sigterm_raises():
            COMMANDS[args.command](args)
        return 0
    except (KeyboardInterrupt, Exception) as exc:  # every end becomes a line and a status
        if _find_in_chain(exc, (KeyboardInterrupt,)) is not None:  # perhaps re-wrapped by a library
            kind = interruption_kind()
            print(f"digits: {MESSAGE[kind]}", file=sys.stderr)
            return EXIT_STATUS[kind]
        if args.debug:
            traceback.print_exc()
        full = _find_in_chain(exc, (OSError,))
        if full is not None and full.errno in (errno.ENOSPC, errno.EDQUOT):
            where = getattr(args, "out", None) or getattr(args, "resume", None) or full.filename
            print(
                f"digits: error: {where}: {os.strerror(full.errno)} (nothing of the output is kept)"
                if args.command != "train"
                else f"digits: error: {where}: {os.strerror(full.errno)}; the run can go on with "
                f"`digits train --resume {where}` once there is room",
                file=sys.stderr,
            )
            return 1
        stopped = _find_in_chain(exc, (WorkersUnavailable,))
        if stopped is not None:
            print(f"digits: {first_line(stopped)}", file=sys.stderr)
            return 1
        user_error = _find_in_chain(exc, (DigitsError,))
        gave_up = None if user_error else _restarts_spent(exc, args)
        message = (
            first_line(user_error)
            if user_error
            else gave_up
            or (f"{type(exc).__name__}: {first_line(exc)}" + ("" if args.debug else " (--debug shows the traceback)"))
        )
        print(f"digits: error: {message}", file=sys.stderr)
        return 2 if user_error else 1


def _restarts_spent(exc: BaseException, args) -> str | None:
    """For a training whose workers failed, or whose nodes were preempted, once more than its
    restarts allow: which budget ran out, what failed (the first worker's error), and how to
    go on."""
    ray_train = sys.modules.get("ray.train")  # loaded if the error came from it
    ended = (ray_train.WorkerGroupError, ray_train.PreemptionError) if ray_train else ()
    failed = _find_in_chain(exc, ended) if ended and args.command == "train" else None
    if failed is None:
        return None
    from digit_models.training.attempts import is_preemption_failure

    first = next(iter((getattr(failed, "worker_failures", None) or {}).values()), failed)
    spent = (
        "the workers' nodes were preempted once more than --max-preemptions allows"
        if is_preemption_failure(failed)
        else "the workers failed once more than --max-failures allows"
    )
    return (
        f"{spent} ({type(first).__name__}: {first_line(first)}); `digits train --resume "
        f"{args.resume or args.out}` goes on from the last checkpoint"
    )


def _find_in_chain(exc: BaseException, types: tuple) -> BaseException | None:
    """The first exception of these types in exc's chain of causes, including the worker
    failures that Ray Train and Ray tasks wrap their errors in. A Ray task's error is an
    instance of its cause's type too, with the remote traceback in its text: the cause it
    keeps is the original."""
    pending, seen = [exc], set()
    while pending:
        exc = pending.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # Ray's task errors keep the original here
        if isinstance(exc, types) and not isinstance(cause, types):
            return exc
        pending += [
            cause,
            getattr(exc, "controller_failure", None),
            exc.__cause__,
            None if exc.__suppress_context__ else exc.__context__,  # `raise ... from None` ends the chain
            *(getattr(exc, "worker_failures", None) or {}).values(),
        ]
        pending = [e for e in pending if isinstance(e, BaseException)]
    return None


class _UsersStdout:
    """The process's stdout, for every writer of it (our results, argparse's help, the live
    console): no URI's credentials in what it carries (stderr's lines lose them on their way:
    runtime/console.py); and once its reader has gone (`| head -2`), what is left to write goes
    to /dev/null, as a Unix tool's output ends at a closed pipe, instead of a BrokenPipeError at
    whichever write happens to come after the close."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        from digit_models.storage.files import without_credentials

        try:
            self._stream.write(without_credentials(text))
            return len(text)
        except BrokenPipeError:
            self._to_null()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_null()

    def _to_null(self) -> None:
        # On the descriptor, so that the buffered rest and the interpreter's last flush go there too.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())
        os.close(null)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def entry_point() -> None:
    """The `digits` command. Its console carries our lines and real warnings, not library
    chatter (runtime/console.py); interrupts end it as runtime/interrupts.py says."""
    from digit_models.runtime.console import stderr_filtered

    sys.stdout = _UsersStdout(sys.stdout)
    with stderr_filtered():
        status = main()
        sys.stdout.flush()
    if status in EXIT_STATUS.values():
        exit_now(status)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()

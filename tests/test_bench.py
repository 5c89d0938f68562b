"""A smoke run of the benchmark harness on a small slice: every step runs for real and the
JSON, the Markdown table and the chart come out. The numbers themselves mean nothing here, but
how they are put together does: every ratio is the quotient of the numbers it is made of, the
table shows the JSON's values, every scoring run scored as many images as it was given, and the
chart has a bar per ratio.

Marked `bench`: the default run (`scripts/test.sh`) leaves it out, CI runs it as a step of its
own (`scripts/test.sh -m bench`, .ci/run). One run of the harness, shared by the tests below.
"""

import json
import os
import re
import struct
import subprocess
import sys

import pytest

from bench.__main__ import QUICK_SCALE, QUICK_TEST_ROWS
from tests.conftest import REPO, SLICE_TRAIN_ROWS

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, kaggle_dir, shared_ray_env):
    """`python -m bench --quick`: the results JSON, BENCHMARKS.md's text and the chart's bytes."""
    out = tmp_path_factory.mktemp("bench")
    results, markdown = out / "results", out / "BENCHMARKS.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--data",
            str(kaggle_dir),
            "--epochs",
            "2",
            "--repeats",
            "1",
            "--results-dir",
            str(results),
            "--markdown",
            str(markdown),
        ],
        cwd=REPO,
        env={**os.environ, **shared_ray_env},
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [json_file] = results.glob("*.json")
    return (json.loads(json_file.read_text()), markdown.read_text(), json_file.with_suffix(".png").read_bytes())


def test_every_ratio_is_the_quotient_of_the_numbers_it_is_made_of(smoke):
    measured, _, _ = smoke
    assert (measured["quick"], measured["settings"]) == (True, {"epochs": 2, "repeats": 1})
    training, fixed = measured["training"], measured["scoring"]["fixed_cost"]
    scaling, overhead, to_target = (
        training["weak_scaling"]["dense@32x1"],
        training["overhead"]["dense"],
        training["time_to_99"],
    )
    # The medians are of the epochs after the first: one epoch of each run (2 epochs, 1 repeat).
    samples = scaling["samples"]
    assert (len(samples["one"]), len(samples["two"]), len(samples["timelines"])) == (1, 1, 2)
    assert (scaling["one_worker"], scaling["two_workers"]) == (samples["one"][0], samples["two"][0])
    # A quick run's --preset fast runs stop at a target they reach in their one epoch.
    assert {name: (entry["reached"], entry["repeats"], entry["epochs"]) for name, entry in to_target.items()} == {
        "1 worker": (1, 1, 1),
        "2 workers": (1, 1, 1),
    }
    one, two = to_target["1 worker"], to_target["2 workers"]
    rates = {(row["server"], row["concurrency"]): row["requests_per_s"] for row in measured["serving"]["rows"]}
    served, plain = ({c: rates[server, c] for c in (1, 8, 32)} for server in ("serve", "plain"))
    assert measured["ratios"] == pytest.approx(
        {
            **_footprint_ratios(measured),
            **_precision_ratios(measured),
            **_ceiling_ratios(measured),
            "weak-scaling efficiency, dense@32x1": scaling["two_workers"] / (2 * scaling["one_worker"]),
            "b/a dense": overhead["b"] / overhead["a"],
            "time to 99%, 2 workers / 1 worker (whole command)": two["wall_s"] / one["wall_s"],
            "time to 99%, 2 workers / 1 worker (training clock)": two["training_s"] / one["training_s"],
            "first step after the command starts (s, 1 worker)": one["first_step_s"],
            "predict wall / plain wall": fixed["digits_wall_s"] / fixed["plain_wall_s"],
            **{
                f"serve requests/s / plain server's, concurrency {concurrency}": served[concurrency]
                / plain[concurrency]
                for concurrency in (1, 8, 32)
            },
        },
        rel=1e-9,
    )
    # Each quotient's parts are real measurements: a positive rate, a first step inside the command.
    assert min(scaling["one_worker"], scaling["two_workers"], overhead["a"], overhead["b"]) > 0
    assert 0 < one["first_step_s"] < one["wall_s"] and 0 < one["training_s"] < one["wall_s"]
    parts = training["step_parts"]["2x1@32"]
    assert set(parts["ms_per_micro_batch"]) == {"keras", "bfloat16", "bfloat16x2"}
    assert (
        min(parts["ms_per_micro_batch"].values()) > 0
        and min(parts[f"{name}_ms"] for name in ("compute", "all_reduce", "all_reduce_bfloat16", "input")) > 0
    )


def _ceiling_ratios(measured: dict) -> dict:
    """Each pair ran as a pair (two rates, each its own run's epochs after the first), and a
    ceiling is the pair's sum over twice the one alone; the 2-worker run is a fraction of each
    pair's sum."""
    entry = measured["ceilings"]["dense@32"]
    samples = entry["samples"]
    assert [len(pair) for pair in samples["plain_pair"] + samples["ray_pair"]] == [2, 2]
    rates = ("plain", "ray", "two_workers", "two_workers_synced_less")
    assert min(sum((samples[name] for name in rates), []) + [min(samples["plain_pair"][0])]) > 0
    assert (entry["plain_pair"], entry["ray_pair"]) == (sum(samples["plain_pair"][0]), sum(samples["ray_pair"][0]))
    return {
        "independent pair / twice one alone, without Ray, dense@32": entry["plain_pair"] / (2 * samples["plain"][0]),
        "independent pair / twice one alone, on one shared Ray, dense@32": entry["ray_pair"] / (2 * samples["ray"][0]),
        "2-worker images/s / the same-Ray independent pair's, dense@32": samples["two_workers"][0] / entry["ray_pair"],
        "2-worker images/s / the independent pair's without Ray, dense@32": samples["two_workers"][0]
        / entry["plain_pair"],
        "2-worker images/s with --sync-every 4 / the same-Ray independent pair's, dense@32": samples[
            "two_workers_synced_less"
        ][0]
        / entry["ray_pair"],
    }


def _precision_ratios(measured: dict) -> dict:
    """bfloat16 against float32 in a quick run's one seed, its accuracies real ones (a CPU
    without bfloat16 instructions runs none, and says so)."""
    result = measured["precision"]
    if "rows" not in result:
        assert result == {"not_run": "this CPU has no bfloat16 instructions"}
        return {}
    [row] = result["rows"]
    f32, bf16 = row["float32"], row["bfloat16"]
    assert (f32["epochs"], bf16["epochs"]) == (3, 3)
    assert all(0.5 < run[name] <= 1 for run in (f32, bf16) for name in ("official_test", "heldout_train"))
    return {
        "`--preset fast` images/s, bfloat16 / float32 (median of seeds)": bf16["images_per_s"] / f32["images_per_s"],
        "`--preset fast` official-test accuracy, bfloat16 - float32 (mean of seeds, points)": 100
        * (bf16["official_test"] - f32["official_test"]),
        "`--preset fast` held-out rows' accuracy, bfloat16 - float32 (mean of seeds, points)": 100
        * (bf16["heldout_train"] - f32["heldout_train"]),
    }


def _footprint_ratios(measured: dict) -> dict:
    """Ray's share of the machine: its CPU seconds over the wall time and the CPUs. (A quick
    run's training input section has one size, so no growth ratios.)"""
    cpus, used = measured["machine"]["cpus"], measured["footprint"]
    share = "Ray's processes, share of the machine's CPU"
    ratios = {
        f"{share}, 1-worker training (whole command)": used["training"]["ray_cpu_s"]
        / (used["training"]["wall_s"] * cpus),
        f"{share}, scoring test.csv (whole command)": used["scoring"]["ray_cpu_s"] / (used["scoring"]["wall_s"] * cpus),
    }
    if "ray_share_training" in used["training"]:  # one epoch of a slice may fall between two readings
        ratios[f"{share}, 1-worker training (its epochs)"] = used["training"]["ray_share_training"]
    return ratios


def test_a_profiled_step_is_parted_per_worker(smoke):
    """The profiled runs of the ceilings section: one worker and no all-reduce; two workers,
    each with the same all-reduces in every step; each worker's trace of whole steps that
    took time, in ops that took time, on threads that used CPU."""
    measured, _, _ = smoke
    for entry in measured["ceilings"].values():
        one, two = entry["profile"]["one_worker"], entry["profile"]["two_workers"]
        assert list(one) == ["0"] and list(two) == ["0", "1"]
        assert one["0"]["collectives_per_step"] == 0 and one["0"]["collective_ms"] == 0
        assert two["0"]["collectives_per_step"] == two["1"]["collectives_per_step"] >= 1
        for parts in [*one.values(), *two.values()]:
            assert parts["steps"] >= 16 and min(parts["step_ms"], parts["compute_ms"], parts["cpu_ms"]["compute"]) > 0


def test_ray_s_own_processes_and_ours_are_told_apart(smoke):
    """Every command's tree has Ray's GCS and raylet and our driver; the training's has its
    worker, the scoring's Ray Data's scoring actor. The training is the input section's run
    (one embedded Ray fewer), whose worker mapped the rows it trains on from the object store,
    every byte."""
    measured, _, _ = smoke
    used = measured["footprint"]
    [size] = measured["training_input"]
    assert used["training"]["runs"] == size["footprint"]["runs"]
    for command, ours in (("training", "ray::RayTrainWorker"), ("scoring", "ray::MapWorker")):
        [run] = used[command]["runs"]
        assert {"GCS", "raylet", "driver", ours} <= set(run["cpu_s_by_class"]), command
        assert 0 < used[command]["ray_cpu_s"] and 0 < used[command]["ours_cpu_s"]
    assert size["rows"] == SLICE_TRAIN_ROWS
    assert size["worker_peak_shared_mb"] == pytest.approx(size["data_mb"], abs=0.1)
    # The rows went into the store from the task that reads the spool; the driver mapped none.
    assert size["driver_peak_shared_mb"] < 0.5 * size["data_mb"]


def test_every_scoring_run_scored_the_images_it_was_given(smoke):
    """images_per_s is the command's count over its wall time: predict.json's `images` for
    `digits predict`, the plain script's own count for it."""
    measured, _, _ = smoke
    scoring = measured["scoring"]
    assert scoring["fixed_cost"]["identical_submissions"] is True
    for path, runs in scoring["fixed_cost"]["samples"].items():
        assert [run["images_per_s"] * run["wall_s"] for run in runs] == pytest.approx([QUICK_TEST_ROWS]), path
    rows = scoring["scale"]["rows"]
    assert [(row["format"], row["path"]) for row in rows] == [
        ("parquet", "digits, 1 actor(s)"),
        ("parquet", "plain"),
        ("csv", "digits, 1 actor(s)"),
        ("csv", "plain"),
    ]
    assert [row["images_per_s"] * row["wall_s"] for row in rows] == pytest.approx([QUICK_SCALE] * 4)
    assert [row["images"] for row in rows] == [QUICK_SCALE] * 4


def test_every_serving_load_was_answered_with_the_same_labels(smoke):
    """Both servers answered every request of each load (the quick run's 100, or what 5 s
    allowed, and the requests its clients had in flight as it ended), and the same labels for
    the same images."""
    measured, markdown, _ = smoke
    serving = measured["serving"]
    assert serving["same_labels"] is True
    assert sorted((row["server"], row["concurrency"]) for row in serving["rows"]) == sorted(
        (server, c) for server in ("plain", "serve") for c in (1, 8, 32)
    )
    for row in serving["rows"]:
        assert row["failed"] == 0 and 0 < row["answered"] < 100 + row["concurrency"], row
        assert row["requests_per_s"] * row["wall_s"] == pytest.approx(row["answered"], rel=0.05)
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        processes = set(row["cpu_ms_per_request"])  # the server's own tree, nothing else
        if row["server"] == "serve":
            assert "ray::ProxyActor" in processes and any(p.startswith("ray::ServeReplica") for p in processes), row
        else:
            assert processes == {"driver"}, row
    assert _table(markdown, "| server | concurrency | total |", columns=3) == [
        [
            "`digits serve`" if row["server"] == "serve" else "plain http.server",
            str(row["concurrency"]),
            f"{sum(row['cpu_ms_per_request'].values()):.2f}",
        ]
        for row in sorted(serving["rows"], key=lambda row: (row["concurrency"], row["server"]))
    ]
    assert _table(markdown, "| server | concurrency |", columns=5) == [
        [
            "`digits serve`" if row["server"] == "serve" else "plain http.server",
            str(row["concurrency"]),
            f"{row['answered']:,}",
            str(row["failed"]),
            _shown(row["requests_per_s"], 0),
        ]
        for row in sorted(serving["rows"], key=lambda row: (row["concurrency"], row["server"]))
    ]


def test_the_markdown_table_holds_the_json_values(smoke):
    """Every table's numbers as the JSON has them, at the precision the table shows."""
    measured, markdown, _ = smoke
    assert markdown.startswith(f"# Benchmarks ({measured['date']}, QUICK SMOKE RUN")
    assert {name: value for name, value, *_ in _table(markdown, "| ratio |")} == {
        name: f"{value:.2f}" for name, value in measured["ratios"].items()
    }
    training, scoring = measured["training"], measured["scoring"]
    flops = measured["arithmetic"]["models"]["dense"]["train_flops"]
    assert _table(markdown, "| model@batch x accumulate |", columns=6) == [
        [
            key,
            _shown(entry["one_worker"], 0),
            _shown(entry["two_workers"], 0),
            _shown(entry["efficiency"], 2),
            _shown(flops / 1e6, 1),
            _shown(flops * entry["two_workers"] / 1e9, 1),
        ]
        for key, entry in training["weak_scaling"].items()
    ]
    assert _table(markdown, "| workers x CPUs @ batch |") == [
        [
            key,
            *(_shown(parts[f"{name}_ms"], 1) for name in ("compute", "all_reduce", "all_reduce_bfloat16", "input")),
            *(_shown(parts["ms_per_micro_batch"][variant], 1) for variant in ("keras", "bfloat16", "bfloat16x2")),
        ]
        for key, parts in training["step_parts"].items()
    ]
    assert _table(markdown, "| workers | whole command |", columns=6) == [
        [
            name,
            _shown(entry["wall_s"], 0),
            _shown(entry["training_s"], 0),
            _shown(entry["first_step_s"], 1),
            f"{entry['epochs']:g}",
            f"{entry['reached']} of {entry['repeats']}",
        ]
        for name, entry in training["time_to_99"].items()
    ]
    assert _table(markdown, "| model | a: seed Keras") == [
        [
            model,
            _shown(entry["a"], 0),
            _shown(entry["b"], 0),
            _shown(entry["b"] / entry["a"], 2),
            _shown(entry["a_wall"], 0),
            _shown(entry["b_wall"], 0),
        ]
        for model, entry in training["overhead"].items()
    ]
    assert _table(markdown, "| model@batch | plain alone |") == [
        [
            key,
            *(_shown(entry[name], 0) for name in ("plain", "plain_pair")),
            _shown(entry["plain_ceiling"], 2),
            *(_shown(entry[name], 0) for name in ("ray", "ray_pair")),
            _shown(entry["ray_ceiling"], 2),
            _shown(entry["two_workers"], 0),
            *(
                _shown(entry[name], 2)
                for name in ("two_workers_of_ray_pair", "two_workers_of_plain_pair", "efficiency")
            ),
            f"{_shown(entry['two_workers_synced_less'], 0)} (K=4)",
            _shown(entry["synced_less_of_ray_pair"], 2),
        ]
        for key, entry in measured["ceilings"].items()
    ]
    assert _table(markdown, "| model@batch | run | rank |") == [
        [
            key,
            run.replace("_", " "),
            rank,
            _shown(parts["step_ms"], 1),
            _shown(parts["compute_ms"], 1),
            f"{_shown(parts['collective_ms'], 1)} ({parts['collectives_per_step']:g})",
            *(_shown(parts["cpu_ms"][kind], 1) for kind in ("compute", "collectives", "grpc", "other")),
        ]
        for key, entry in measured["ceilings"].items()
        for run, ranks in entry["profile"].items()
        for rank, parts in ranks.items()
    ]
    fixed = scoring["fixed_cost"]
    assert _table(markdown, "| | wall |", columns=2) == [
        ["plain script", _shown(fixed["plain_wall_s"], 1)],
        ["`digits predict`, 1 actor", _shown(fixed["digits_wall_s"], 1)],
    ]
    assert _table(markdown, "| images | format |", columns=6) == [
        [
            f"{row['images']:,}",
            row["format"],
            row["path"],
            _shown(row["wall_s"], 1),
            _shown(row["images_per_s"], 0),
            _shown(row.get("driver_peak_rss_mb", row.get("peak_rss_mb")), 0),
        ]
        for row in scoring["scale"]["rows"]
    ]


def test_the_chart_has_a_bar_per_ratio(smoke):
    """bench/report.py `chart`: 9 inches wide, 0.45 inch per bar and 1.2 more, at 110 dpi; the
    ratios in seconds are left out."""
    measured, _, png = smoke
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    bars = sum("(s," not in name for name in measured["ratios"])
    assert bars == 8 + len(_footprint_ratios(measured)) + len(_precision_ratios(measured)) + 5
    assert width == 990 and abs(height - (0.45 * bars + 1.2) * 110) <= 1


def test_the_footprint_and_input_tables_hold_the_json_values(smoke):
    from bench.report import NOT_SAMPLED

    measured, markdown, _ = smoke
    used = measured["footprint"]
    assert _table(markdown, "| command | wall |") == [
        [
            name,
            _shown(entry["wall_s"], 0),
            _shown(entry["ray_cpu_s"], 1),
            _shown(entry["ray_cpu_s_per_minute"], 1),
            _shown(entry["ray_share"], 3),
            _shown(entry["ours_cpu_s"], 1),
        ]
        for name, entry in (("1-worker training", used["training"]), ("scoring test.csv, 1 actor", used["scoring"]))
    ]
    assert _table(markdown, "| rows | rows held |", columns=8) == [
        [
            f"{size['rows']:,}",
            _shown(size["data_mb"], 0),
            _shown(size["driver_peak_rss_mb"], 0),
            _shown(size["driver_peak_private_mb"], 0),
            _shown(size["driver_peak_shared_mb"], 0),
            NOT_SAMPLED if size["putter_peak_private_mb"] is None else _shown(size["putter_peak_private_mb"], 0),
            NOT_SAMPLED if size["putter_peak_shared_mb"] is None else _shown(size["putter_peak_shared_mb"], 0),
            _shown(size["worker_peak_shared_mb"], 0),
        ]
        for size in measured["training_input"]
    ]


def _table(markdown: str, header: str, columns: int | None = None) -> list[list[str]]:
    """The first `columns` cells of each row of the table whose header row starts with
    `header`, a number's unit (" s", " ms", " MB") dropped."""
    lines = markdown.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"^([\d,.]+) (s|ms|MB)$", r"\1", cell.strip()) for cell in line.strip("|").split("|")]
        rows.append(cells[:columns])
    return rows


def _shown(value: float, decimals: int) -> str:
    """A number as the tables show it."""
    return f"{value:,.{decimals}f}"


def test_an_update_keeps_the_run_that_measured_each_kept_section(tmp_path):
    """`--update` from results that had themselves kept sections from an older run: those keep
    the older run's date and peak, the rest the earlier run's date, peak and CPU flags."""
    from bench.__main__ import _keep_other_sections
    from bench.report import _kept_note

    older = {"sections": ["training", "scoring"], "date": "2026-01-01", "wall_s": 600, "peak_gflops": 200.0}
    earlier = {
        "date": "2026-02-01",
        "wall_s": 300,
        "arithmetic": {"peak_gflops": 50.0},
        "machine": {"cpu_flags": ["avx2", "fma"]},
        "training": {},
        "scoring": {},
        "footprint": {},
        "kept": older,  # as results written before the grouping hold it
    }
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    results = {"sections": ["serving"], "serving": {}}
    _keep_other_sections(results, tmp_path / "earlier.json")
    assert results["kept"] == [
        {
            "sections": ["footprint"],
            "date": "2026-02-01",
            "wall_s": 300,
            "peak_gflops": 50.0,
            "cpu_flags": ["avx2", "fma"],
        },
        older,
    ]
    note = _kept_note(results)
    assert (
        "The footprint section is kept from an earlier run (2026-02-01, 5 minutes, matmul peak 50 GFLOP/s, "
        "CPU flags avx2, fma; " in note
    )
    assert (
        "The training and scoring sections are kept from an earlier run (2026-01-01, 10 minutes, matmul peak 200 "
        in note
    )


def test_a_time_to_99_that_a_repeat_missed_is_shown_unjudged():
    """The time-to-99% ratios are of the medians; where a repeat ended short of 99% (every
    epoch run), the ratio's name says how many repeats reached it, and no target is judged."""
    from bench.report import ratios, verdict

    def training(reached_by_two: int) -> dict:
        run = {"wall_s": 60.0, "training_s": 40.0, "first_step_s": 14.0, "repeats": 2}
        return {
            "training": {
                "weak_scaling": {},
                "overhead": {},
                "time_to_99": {"1 worker": {**run, "reached": 2}, "2 workers": {**run, "reached": reached_by_two}},
            }
        }

    every = ratios(training(2))
    assert verdict("time to 99%, 2 workers / 1 worker (whole command)", 0.8) == ("<= 0.85", "met")
    assert verdict("time to 99%, 2 workers / 1 worker (training clock)", 0.8) == ("<= 0.7", "**missed**")
    assert every["time to 99%, 2 workers / 1 worker (whole command)"] == 1.0
    short = ratios(training(1))
    name = "time to 99%, 2 workers / 1 worker (training clock; 99% reached in 2 workers 1 of 2 repeats)"
    assert short[name] == 1.0 and verdict(name, short[name]) == ("<= 0.7", "unproven")

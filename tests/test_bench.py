"""A smoke run of the benchmark harness on a small slice: every step runs for real and the
JSON, the Markdown table and the chart come out. The numbers themselves mean nothing here."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(900)
def test_the_harness_runs_every_benchmark_and_writes_its_reports(tmp_path, kaggle_dir, shared_ray_env):
    results, markdown = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--data", str(kaggle_dir), "--epochs", "2",
         "--repeats", "1", "--results-dir", str(results), "--markdown", str(markdown)],
        cwd=REPO, env={**os.environ, **shared_ray_env}, capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stderr[-3000:]
    [json_file] = results.glob("*.json")
    measured = json.loads(json_file.read_text())
    # A quick run: one epoch of the fast preset (short of 99% on a slice: no time-to-99 ratio),
    # one input size (no marginal rate, no growth of the driver's memory).
    assert set(measured["ratios"]) == {"weak-scaling efficiency, dense@32x1", "b/a dense",
                                       "first step after the command starts (s, 1 worker)",
                                       "predict wall / plain wall"}
    assert all(value > 0 for value in measured["ratios"].values())
    training = measured["training"]
    assert training["weak_scaling"]["dense@32x1"]["two_workers"] > 0
    assert set(training["time_to_99"]) == {"1 worker", "2 workers"}
    assert training["step_parts"]["2x1@32"]["ms_per_micro_batch"]["bfloat16x2"] > 0
    scoring = measured["scoring"]
    assert scoring["fixed_cost"]["identical_submissions"]
    assert {(row["format"], row["path"]) for row in scoring["scale"]["rows"]} == {
        ("parquet", "digits, 1 actor(s)"), ("parquet", "plain"), ("csv", "digits, 1 actor(s)"), ("csv", "plain")}
    assert measured["arithmetic"]["peak_gflops"] > 0
    table = markdown.read_text()
    assert "QUICK SMOKE RUN" in table and "| weak-scaling efficiency, dense@32x1 |" in table
    assert "## Scoring at scale" in table and "Where a step's time goes" in table
    assert json_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

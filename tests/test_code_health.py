"""The code's own checks, run by the test suite so that CI and a developer run them alike: ruff
(with bugbear's rules) on everything, the import-linter layers contract and mypy on pipeline/ and calibration/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess:
    tool = shutil.which(command[0]) or str(Path(sys.executable).with_name(command[0]))
    return subprocess.run([tool, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "pipeline", "calibration", "tests", "bench", "docs")
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_run_one_way_down_the_layers():
    result = _run("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing():
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr

"""The code stays ruff- and mypy-clean: the same checks as `make lint` and `make typecheck`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, which


def test_ruff() -> None:
    ruff = which("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-5000:]

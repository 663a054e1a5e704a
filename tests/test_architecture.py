"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml) pass.

The contracts are only worth something if they can fail, so the same check also runs on a copy of
the tree into which a wrong import has been planted, once per contract, and must name the contract
it breaks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, which

PACKAGES = ("service", "workers", "migrations")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the tree in ``root`` wins over the editable install
    return subprocess.run(
        [which("lint-imports"), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_contracts_hold() -> None:
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " 0 broken" in out.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    ignore = shutil.ignore_patterns("__pycache__", "*.pt", "*.onnx", "weights")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        # the API reaching into the pipeline (it must only serve what the worker stored)
        ("service/api/_wrong.py", "import workers.pipeline", "sit on the core"),
        # the core depending on an application above it
        ("service/core/_wrong.py", "from service.receive import scp", "sit on the core"),
        # the SCP and the API are independent of each other
        ("service/receive/_wrong.py", "import service.api.main", "sit on the core"),
        # serving pulling in the phantom (and with it training's dependencies)
        ("workers/infer/_wrong.py", "from workers.training import phantom", "never imports training"),
        # the API process loading torch
        ("service/api/_wrong.py", "import torch", "load no network"),
    ],
)
def test_a_wrong_import_breaks_its_contract(
    tree_copy: Path, module: str, wrong_import: str, contract: str
) -> None:
    planted = tree_copy / module
    planted.write_text(f'"""Planted by tests/test_architecture.py."""\n\n{wrong_import}\n')
    try:
        out = lint_imports(tree_copy)
    finally:
        planted.unlink()
    assert out.returncode != 0, out.stdout[-3000:]
    broken = out.stdout.split("Broken contracts")[-1]
    assert contract in " ".join(broken.split()), out.stdout[-3000:]
    assert module.removesuffix(".py").replace("/", ".") in broken

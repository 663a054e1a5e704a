"""`lusai model verify|show|package`, `--model` on analyze, and workers refusing a bad package at start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli.app import app
from service.core.model_package import DEFAULT_PACKAGE, MANIFEST_NAME, load_package, write_package
from tests.factories import phantom_cine_file


@pytest.fixture
def broken_package(tmp_path: Path) -> Path:
    """A copy of the shipped package whose score_config.json was edited after packaging."""
    pkg = tmp_path / "broken"
    shutil.copytree(DEFAULT_PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "score_config.json").write_text('{"persist_s": 0.0}')
    return pkg


def test_verify_exit_codes(tmp_path: Path, broken_package: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["model", "verify"])
    assert ok.exit_code == 0 and "ok: lusai-lus-attention-unet 0.2.1" in ok.stdout
    assert load_package(DEFAULT_PACKAGE).package_sha256 in ok.stdout
    bad = runner.invoke(app, ["model", "verify", str(broken_package)])
    assert bad.exit_code == 1 and "score_config.json (role score_config)" in bad.stderr
    loose = tmp_path / "loose"
    loose.mkdir()
    none = runner.invoke(app, ["model", "verify", str(loose)])
    assert none.exit_code == 1 and "not a model package" in none.stderr
    assert runner.invoke(app, ["model", "show", str(broken_package)]).exit_code == 1


def test_show_prints_the_verified_manifest() -> None:
    res = CliRunner().invoke(app, ["model", "show", str(DEFAULT_PACKAGE)])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["verified"] is True
    assert shown["manifest"] == json.loads((DEFAULT_PACKAGE / MANIFEST_NAME).read_text())


def test_package_command_packages_loose_files(tmp_path: Path) -> None:
    loose = tmp_path / "run"
    loose.mkdir()
    for name in ("lus_unet.pt", "lus_unet.onnx", "metrics.json"):
        shutil.copyfile(DEFAULT_PACKAGE / name, loose / name)
    cv = tmp_path / "cv.json"
    cv.write_text(json.dumps({"kappa_qw": 0.3}))
    runner = CliRunner()
    score_config = DEFAULT_PACKAGE / "score_config.json"
    argv = ["model", "package", str(loose), "--name", "m", "--version", "1.0", "--cv", str(cv),
            "--parent", str(DEFAULT_PACKAGE), "--file", f"score_config={score_config}"]  # fmt: skip
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    pkg = load_package(loose)
    assert (pkg.name, pkg.version, pkg.cv) == ("m", "1.0", {"kappa_qw": 0.3})
    assert (
        pkg.parent is not None
        and pkg.parent["package_sha256"] == load_package(DEFAULT_PACKAGE).package_sha256
    )
    assert set(pkg.files) == {"segmenter_torch", "segmenter_onnx", "metrics", "score_config"}
    bad = runner.invoke(app, ["model", "package", str(loose), "--file", "nonsense"])
    assert bad.exit_code == 2


def test_analyze_with_another_package(tmp_path: Path) -> None:
    shipped = load_package(DEFAULT_PACKAGE)
    pkg = write_package(
        tmp_path / "pkg", name="lusai-test-model", version="9.9.9", parent=shipped,
        files={"segmenter_torch": shipped.files["segmenter_torch"]},  # no ONNX, no operating point
    )  # fmt: skip
    cine = phantom_cine_file(tmp_path / "cine.dcm", frames=4)
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(cine), "--json", "--device", "cpu", "--model", str(pkg.path)])
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout.splitlines()[0])
    assert line["model"] == {"name": "lusai-test-model", "version": "9.9.9",
                             "weights_sha256": shipped.sha256s["segmenter_torch"],
                             "package_sha256": pkg.package_sha256}  # fmt: skip
    default = runner.invoke(app, ["analyze", str(cine), "--json", "--device", "cpu"])
    assert json.loads(default.stdout.splitlines()[0])["model"]["package_sha256"] == shipped.package_sha256
    alias = runner.invoke(
        app, ["analyze", str(cine), "--json", "--device", "cpu", "--weights", str(pkg.path)]
    )
    assert alias.exit_code == 0 and json.loads(alias.stdout.splitlines()[0])["model"]["version"] == "9.9.9"
    missing = runner.invoke(app, ["analyze", str(cine), "--model", str(tmp_path)])
    assert missing.exit_code == 1 and "not a model package" in missing.stderr


def _env(tmp_path: Path, package: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env.update(LUSAI_DATA_DIR=str(tmp_path / "data"), LUSAI_MODEL_PATH=str(package))
    return env


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "service", "worker"],
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--pool", "solo"],
    ],
    ids=["lusai-worker", "celery-directly"],
)
def test_worker_refuses_a_bad_package_at_start(tmp_path: Path, broken_package: Path, argv: list[str]) -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        argv, env=_env(tmp_path, broken_package), capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "bad model package" in log and "score_config.json (role score_config)" in log
    assert "Traceback" not in log
    assert elapsed < 60


def test_check_worker_verifies_the_package(tmp_path: Path, broken_package: Path) -> None:
    argv = [sys.executable, "-m", "service", "check", "worker"]
    out = subprocess.run(
        argv, env=_env(tmp_path, broken_package), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "score_config.json (role score_config)" in out.stderr


def test_train_writes_a_complete_package(tmp_path: Path) -> None:
    out = tmp_path / "models" / "phantom-3"
    argv = ["train", "--out", str(out), "--seed", "3", "--epochs", "1", "--samples", "4",
            "--val-samples", "2", "--batch", "4", "--threads", "1"]  # fmt: skip
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    pkg = load_package(out)
    assert (pkg.name, pkg.version, pkg.parent) == ("lusai-lus-attention-unet", "phantom-3", None)
    assert set(pkg.files) == {"segmenter_torch", "segmenter_onnx", "metrics"}  # no operating point yet
    assert pkg.training["seed"] == 3 and pkg.training["counts"] == {"train_frames": 4, "validation_frames": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["phantom-3"]  # staging folder removed
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    refused = CliRunner().invoke(app, ["train", "--out", str(busy), "--samples", "4"])
    assert refused.exit_code == 1 and "not a model package" in refused.stderr


def test_train_writes_into_the_data_dir_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not into the source tree or the working directory: $LUSAI_DATA_DIR/models/NAME-VERSION."""
    monkeypatch.setenv("LUSAI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    bad = CliRunner().invoke(app, ["train", "--version", "../up"])  # refused before any training
    assert bad.exit_code == 1 and "version '../up' must match" in bad.stderr
    argv = ["train", "--seed", "3", "--epochs", "1", "--samples", "4", "--val-samples", "2", "--batch", "4",
            "--threads", "1"]  # fmt: skip
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    shipped = load_package(DEFAULT_PACKAGE, verify=False)
    pkg = load_package(tmp_path / "data" / "models" / f"{shipped.name}-phantom-3")
    assert (pkg.name, pkg.version, pkg.classes) == (shipped.name, "phantom-3", shipped.classes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

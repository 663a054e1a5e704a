"""The compose file validates with Docker's own tooling; the Dockerfile keeps its promises."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import REPO, missing


def _compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    missing("docker compose / docker-compose")
    raise AssertionError


def test_compose_config_is_valid() -> None:
    out = subprocess.run(
        [*_compose(), "--profile", "cpu", "config"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    services = doc["services"]
    assert {
        "postgres",
        "redis",
        "lusai-scp",
        "lusai-api",
        "lusai-worker",
        "lusai-worker-cpu",
        "lusai-deliver",
        "orthanc",
    } <= set(services)
    gpu = services["lusai-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["lusai-worker"]["command"] == ["worker", "--queues", "analyze"]
    assert services["lusai-deliver"]["command"] == ["worker", "--queues", "deliver"]
    assert "deploy" not in services["lusai-deliver"]  # no GPU for deliveries
    for name in ("lusai-scp", "lusai-api", "lusai-worker", "lusai-deliver"):
        env = services[name]["environment"]
        assert env["LUSAI_DATABASE_URL"].startswith("postgresql") and env["LUSAI_BROKER_URL"].startswith(
            "redis"
        )
        assert "healthcheck" in services[name]


def test_dockerfile_is_multistage_non_root_with_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert {"slim", "gpu"} <= set(stages) and stages[-1] == "slim"  # default target is the slim image
    assert "USER lusai" in text and "HEALTHCHECK" in text
    assert "torch==2.13.*" in text


def test_env_template_names_only_real_settings() -> None:
    import re

    from service.core.settings import Settings

    known = {f"LUSAI_{n.upper()}" for n in Settings.model_fields}
    text = (REPO / "deploy" / "env" / "production.env.example").read_text()
    used = set(re.findall(r"^#?(LUSAI_[A-Z0-9_]+)=", text, flags=re.M))
    assert used and used <= known, f"unknown settings in the template: {used - known}"

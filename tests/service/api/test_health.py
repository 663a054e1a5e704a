"""``/health`` and ``/metrics`` on the worker registry: live workers and what they run, a warning
when no worker analyses (never a 503), queue depths and per-worker gauges."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service.core import lifecycle, registry
from service.core.models import Job, JobState, Worker
from tests.rows import add_instance, add_job
from tests.service.api.conftest import Api, make_sqlite_api


def _identity(
    name: str, device: str = "cpu", queues: tuple[str, ...] = ("analyze", "analyze.cpu")
) -> registry.Identity:
    return registry.Identity(
        name=name,
        host=name.rpartition("@")[2],
        pid=7,
        queues=queues,
        device=device,
        gpu_name="NVIDIA H200" if device == "cuda" else None,
        concurrency=2,
        version="0.1.0",
    )


def _workers(api: Api) -> tuple[int, int]:
    """A live CPU worker running a job, a live deliver-only worker and a lost GPU worker; returns
    (job ID, queued job ID)."""
    with api.session() as s:
        for me in (
            _identity("cpu-1@host-a"),
            _identity("deliver-1@host-a", queues=("deliver",)),
            _identity("gpu-1@host-b", device="cuda", queues=("analyze", "analyze.gpu")),
        ):
            registry.register(s, me)
        now = lifecycle.db_now(s)
        s.execute(
            update(Worker).where(Worker.name == "gpu-1@host-b").values(last_seen=now - timedelta(minutes=5))
        )
        instance = add_instance(s)
        running = add_job(s, instance, JobState.RUNNING, worker_name="cpu-1@host-a", started_at=now)
        queued = add_job(s, instance, JobState.QUEUED, created_at=now - timedelta(seconds=120))
    return running, queued


def test_health_lists_the_live_workers_and_their_jobs(api: Api) -> None:
    before = api.client.get("/health")
    body = before.json()
    assert body["workers"] == [] and body["warnings"] == ["no analyze worker alive"]
    running, _ = _workers(api)
    after = api.client.get("/health")
    assert after.status_code == before.status_code  # workers never decide readiness
    body = after.json()
    assert body["warnings"] == []
    assert [w["name"] for w in body["workers"]] == [
        "cpu-1@host-a",
        "deliver-1@host-a",
    ]  # the lost one left out
    cpu = body["workers"][0]
    assert {k: cpu[k] for k in ("host", "queues", "device", "gpu", "concurrency", "version")} == {
        "host": "host-a",
        "queues": ["analyze", "analyze.cpu"],
        "device": "cpu",
        "gpu": None,
        "concurrency": 2,
        "version": "0.1.0",
    }
    assert 0 <= cpu["last_seen_s"] < 30
    assert [j["job_id"] for j in cpu["jobs_in_flight"]] == [running] and cpu["jobs_in_flight"][0]["since"]
    assert body["workers"][1]["jobs_in_flight"] == []


@pytest.fixture
def gpu_only_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> Iterator[Api]:
    yield from make_sqlite_api(sqlite_template, tmp_path, monkeypatch, analyze_routing="gpu-only")


def test_gpu_only_routing_without_a_live_gpu_worker_is_a_warning(gpu_only_api: Api) -> None:
    _workers(gpu_only_api)  # its GPU worker is lost
    body = gpu_only_api.client.get("/health").json()
    assert body["warnings"] == ["no GPU worker alive (LUSAI_ANALYZE_ROUTING=gpu-only)"]
    with gpu_only_api.session() as s:
        registry.beat(s, "gpu-1@host-b")
    assert gpu_only_api.client.get("/health").json()["warnings"] == []


def _samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in the exposition text."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(\{{.*\}})? (\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_metrics_show_queue_depths_workers_and_the_oldest_queued_job(api: Api) -> None:
    text = api.client.get("/metrics").text
    assert _samples(text, "lusai_queue_depth") == {
        '{queue="analyze"}': 0,
        '{queue="analyze.gpu"}': 0,
        '{queue="analyze.cpu"}': 0,
        '{queue="deliver"}': 0,
    }
    assert _samples(text, "lusai_oldest_queued_job_age_seconds") == {"": 0}
    assert _samples(text, "lusai_worker_up") == {}
    running, queued = _workers(api)
    api.runtime.queue.enqueue_analysis(queued)  # embedded broker: a message file on analyze
    with api.session() as s:  # stopped workers are left out
        registry.register(s, _identity("gone-1@host-c"))
        registry.stopped(s, "gone-1@host-c")
    text = api.client.get("/metrics").text
    assert _samples(text, "lusai_queue_depth")['{queue="analyze"}'] == 1
    assert _samples(text, "lusai_worker_up") == {
        '{device="cpu",host="host-a",worker="cpu-1@host-a"}': 1,
        '{device="cpu",host="host-a",worker="deliver-1@host-a"}': 1,
        '{device="cuda",host="host-b",worker="gpu-1@host-b"}': 0,
    }
    assert _samples(text, "lusai_worker_jobs_in_flight") == {
        '{worker="cpu-1@host-a"}': 1,
        '{worker="deliver-1@host-a"}': 0,
        '{worker="gpu-1@host-b"}': 0,
    }
    seen = _samples(text, "lusai_worker_last_seen_seconds")
    assert seen['{worker="cpu-1@host-a"}'] < 30 and seen['{worker="gpu-1@host-b"}'] >= 290
    assert 119 <= _samples(text, "lusai_oldest_queued_job_age_seconds")[""] < 200
    with api.session() as s:  # the running job ends: no longer in flight
        s.execute(update(Job).where(Job.id == running).values(state=JobState.SUCCEEDED))
    in_flight = _samples(api.client.get("/metrics").text, "lusai_worker_jobs_in_flight")
    assert in_flight['{worker="cpu-1@host-a"}'] == 0

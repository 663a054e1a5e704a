"""Liveness and readiness. No authentication: load balancers and compose health checks call it."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import AppRuntime, api_state
from service.api.metrics import REGISTRY
from service.core import registry
from service.core.queue import ANALYZE_GPU_QUEUE, ANALYZE_QUEUES
from service.core.runtime import Runtime
from service.core.settings import Settings

router = APIRouter(tags=["health"])


def _check(fn: Any) -> dict[str, Any]:
    try:
        fn()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}


def _storage(runtime: Runtime) -> None:
    if not runtime.store.writable():
        raise OSError("storage not writable")


def _model(s: Settings) -> None:
    from importlib.util import find_spec

    if find_spec("workers.infer") is None:
        raise ModuleNotFoundError("workers.infer")
    if s.model_path is not None:  # a complete package (hashes are the worker's check at start)
        from service.core.model_package import load_package

        load_package(s.model_path, verify=False)


def _workers(runtime: Runtime) -> tuple[list[dict[str, Any]], list[str]]:
    """The live workers of the registry, and warnings about them (none when it cannot be read:
    the database check says why)."""
    try:
        with runtime.db.session() as session:
            found = registry.workers(session, lost_after=runtime.settings.lost_after)
    except Exception:
        return [], []
    live = [w for w in found if w.alive]
    warnings = []
    if not any(w.consumes(ANALYZE_QUEUES) for w in live):
        warnings.append("no analyze worker alive")
    elif runtime.settings.analyze_routing == "gpu-only" and not any(
        w.device == "cuda" and w.consumes([ANALYZE_GPU_QUEUE]) for w in live
    ):
        warnings.append("no GPU worker alive (LUSAI_ANALYZE_ROUTING=gpu-only)")
    shown = [
        {
            "name": w.name,
            "host": w.host,
            "queues": list(w.queues),
            "device": w.device,
            "gpu": w.gpu_name,
            "concurrency": w.concurrency,
            "version": w.version,
            "last_seen_s": w.last_seen_s,
            "jobs_in_flight": [
                {"job_id": j.job_id, "since": j.since.isoformat() if j.since else None} for j in w.jobs
            ],
            "jobs_done": w.jobs_done,
            "jobs_failed": w.jobs_failed,
        }
        for w in live
    ]
    return shown, warnings


@router.get(
    "/health",
    summary="Liveness and readiness (database, broker, storage, model); the live workers",
    description=(
        "`checks` decide readiness (503 when one fails). `workers` lists the workers whose heartbeat"
        " is younger than LUSAI_WORKER_LOST_AFTER, with the jobs each is running; `warnings` says"
        " when no worker consumes an analysis queue (the API works without workers: not a 503)."
    ),
    responses={503: {"description": "Not ready: at least one check failed (same body)"}},
)
async def health(response: Response, runtime: AppRuntime) -> dict[str, Any]:
    checks = {
        "database": await asyncio.to_thread(_check, runtime.db.ping),
        "broker": await asyncio.to_thread(_check, runtime.queue.ping),
        "storage": await asyncio.to_thread(_check, partial(_storage, runtime)),
        "model": await asyncio.to_thread(_check, partial(_model, runtime.settings)),
    }
    ok = all(c["ok"] for c in checks.values())
    response.status_code = 200 if ok else 503
    workers, warnings = await asyncio.to_thread(_workers, runtime)
    return {"status": "ok" if ok else "degraded", "checks": checks, "workers": workers, "warnings": warnings}


@router.get("/health/live", summary="Liveness only: the process answers")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    gauges = api_state(request).gauges
    data = await asyncio.to_thread(lambda: generate_latest(REGISTRY) + generate_latest(gauges))
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)

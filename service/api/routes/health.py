"""Liveness and readiness. No authentication: load balancers and compose health checks call it."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.metrics import REGISTRY
from service.core.db import ping
from service.core.queue import broker_ping
from service.core.settings import get_settings
from service.core.storage import ObjectStore

router = APIRouter(tags=["health"])


def _check(fn: Any) -> dict[str, Any]:
    try:
        fn()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}


def _storage() -> None:
    if not ObjectStore(get_settings().storage).writable():
        raise OSError("storage not writable")


def _model() -> None:
    from importlib.util import find_spec

    s = get_settings()
    if find_spec("workers.infer") is None:
        raise ModuleNotFoundError("workers.infer")
    if s.model_path is not None:  # a complete package (hashes are the worker's check at start)
        from workers.infer.package import load_package

        load_package(s.model_path, verify=False)


@router.get(
    "/health",
    summary="Liveness and readiness (database, broker, storage, model)",
    responses={503: {"description": "Not ready: at least one check failed (same body)"}},
)
async def health(response: Response) -> dict[str, Any]:
    checks = {
        "database": await asyncio.to_thread(_check, ping),
        "broker": await asyncio.to_thread(_check, broker_ping),
        "storage": await asyncio.to_thread(_check, _storage),
        "model": await asyncio.to_thread(_check, _model),
    }
    ok = all(c["ok"] for c in checks.values())
    response.status_code = 200 if ok else 503
    return {"status": "ok" if ok else "degraded", "checks": checks}


@router.get("/health/live", summary="Liveness only: the process answers")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    data = await asyncio.to_thread(generate_latest, REGISTRY)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)

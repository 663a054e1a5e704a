"""Objects stored while the database was down, waiting to be indexed.

A spool record is a tiny JSON file named after the content hash (never a UID); :func:`drain_spool`
(a step of the recovery sweep) re-reads the stored object's header and runs the normal indexing,
so nothing received is ever lost.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from service.core.header import RejectedObject, read_header
from service.core.ingest import enqueue_job, index_object, rules_from
from service.core.logs import ctx
from service.core.runtime import Runtime
from service.core.settings import Settings

log = logging.getLogger(__name__)


def spool_dir(settings: Settings) -> Path:
    d = settings.data_dir / "spool"
    d.mkdir(parents=True, exist_ok=True)
    return d


def spool_object(settings: Settings, key: str, calling_ae: str | None) -> bool:
    try:
        d = spool_dir(settings)
        name = Path(key).stem
        tmp = d / f".{name}.tmp"
        tmp.write_text(
            json.dumps({"key": key, "calling_ae": calling_ae, "received_at": datetime.now(UTC).isoformat()})
        )
        os.replace(tmp, d / f"{name}.json")
        return True
    except OSError:
        log.exception("could not write spool record", extra=ctx(key=key))
        return False


def pending(settings: Settings) -> list[tuple[Path, dict[str, str | None]]]:
    out = []
    for p in sorted(spool_dir(settings).glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            log.warning("unreadable spool record skipped", extra=ctx(record=p.name))
    return out


def drain_spool(runtime: Runtime) -> int:
    """Index and queue spooled objects; stops at the first database error (still down: next sweep)."""
    settings, store = runtime.settings, runtime.store
    done = 0
    for record_path, record in pending(settings):
        key = str(record["key"])
        try:
            header, _ = read_header(store.path(key))
            ignore = rules_from(settings).decide(header, record.get("calling_ae"))
            size = store.path(key).stat().st_size
            sha = key.rsplit("/", 1)[-1].removesuffix(".dcm")
            outcome = index_object(
                header,
                key,
                sha,
                size,
                calling_ae=record.get("calling_ae"),
                ignore_reason=ignore,
                db=runtime.db,
            )
        except (RejectedObject, ValueError):  # a bad record or object: nothing to index, drop the record
            log.warning("spooled object unreadable; left in storage", extra=ctx(key=key))
        except Exception:
            log.warning("spool not drained yet", extra=ctx(key=key))
            return done
        else:
            if outcome.job_id is not None:
                enqueue_job(outcome.job_id, runtime)
        record_path.unlink(missing_ok=True)
        done += 1
    return done

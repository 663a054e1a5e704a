"""Objects stored while the database was down, waiting to be indexed.

A spool record is a tiny JSON file named after the content hash (never a UID); recovery re-reads
the stored object's header and runs the normal indexing, so nothing received is ever lost.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from service.core.logs import ctx
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

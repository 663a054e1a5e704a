"""Persist one analysis: DICOM outputs and previews into storage, the Result row, and the delivery outbox.

All in one transaction so a crash leaves either nothing (the job is retried) or everything; the
outputs' UIDs are deterministic, so a retry rewrites the same objects rather than adding copies.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from sqlalchemy import delete

from service.core import lifecycle
from service.core.dicom import OutputKind
from service.core.models import Job, Result
from service.core.runtime import Runtime
from service.core.settings import Settings
from service.core.storage import ObjectStore
from workers.domain import Analysis
from workers.write_dicom.previews import Caption, store_previews

if TYPE_CHECKING:
    from workers.write_dicom.build import Output


def _store_dataset(ds: Dataset, store: ObjectStore) -> str:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    key, _sha, _size = store.put_bytes([buf.getvalue()])
    return key


def build_result_outputs(source: Dataset, analysis: Analysis, settings: Settings) -> list[Output]:
    """SEG and SR always; the burned-in overlay SC when enabled (it needs the frames decoded again)."""
    from workers.write_dicom.build import OutputOptions, build_outputs

    frames = None
    if settings.overlay_sc:
        from workers.preprocess import decode_frames

        frames = decode_frames(source)
    return build_outputs(
        source, analysis, frames_rgb=frames, options=OutputOptions(uid_root=settings.uid_root)
    )


def save_result(job_id: int, analysis: Analysis, source: Dataset, *, runtime: Runtime) -> list[int] | None:
    """Write outputs and rows; returns the IDs of deliveries to send now, None if the job was
    cancelled (or deleted) while it ran and nothing was kept."""
    settings, store = runtime.settings, runtime.store
    outputs = build_result_outputs(source, analysis, settings)
    stored = [(o, _store_dataset(o.dataset, store)) for o in outputs]
    f = analysis.findings
    seg = next((o.dataset for o in outputs if o.kind == OutputKind.SEG), None)
    caption = Caption.of(analysis)
    previews = store_previews(store, source, seg, caption, key_frame=f.key_frame, settings=settings)
    with runtime.db.session() as session:
        won = lifecycle.succeed(
            session, job_id, model_version=analysis.model.version, timings_ms=analysis.timings_ms
        )
        job = session.get(Job, job_id)
        if not won or job is None:
            return None  # cancelled while running: keep nothing, send nothing
        session.execute(delete(Result).where(Result.job_id == job_id))
        session.flush()
        result = Result(
            job_id=job.id,
            instance_id=job.instance_id,
            score=f.reported_score,
            gradable=f.gradable,
            ungradable_reason=f.ungradable_reason,
            frame_scores=list(f.frame_scores),
            key_frame=f.key_frame,
            b_line_fraction=f.b_line_fraction,
            b_line_count=f.b_line_count,
            consolidation=f.consolidation,
            effusion=f.effusion,
            measurements=f.to_dict(),
            model_name=analysis.model.name,
            model_version=analysis.model.version,
            weights_sha256=analysis.model.weights_sha256,
            model_package_sha256=analysis.model.package_sha256 or None,
            preview_png_key=previews.png,
            preview_gif_key=previews.gif,
            preview_webp_key=previews.webp,
            preview_error=previews.error,
        )
        for output, key in stored:
            _record(result, output, key)
        session.add(result)
        session.flush()
        destination = settings.destination_for(job.instance.calling_ae)
        delivery_ids: list[int] = []
        if destination is not None:
            for output, key in stored:
                if not settings.wants(output.kind, destination):
                    continue
                delivery_id = lifecycle.upsert_delivery(
                    session,
                    result_id=result.id,
                    destination=str(destination),
                    sop_class_uid=str(output.dataset.SOPClassUID),
                    sop_instance_uid=str(output.dataset.SOPInstanceUID),
                    storage_key=key,
                )
                if delivery_id is not None:  # None: the identical object is already in PACS
                    delivery_ids.append(delivery_id)
    return delivery_ids


def _record(result: Result, output: Output, key: str) -> None:
    """Fill the Result columns of one output: its SOP Instance UID and storage key."""
    uid = str(output.dataset.SOPInstanceUID)
    match output.kind:
        case OutputKind.SEG:
            result.seg_sop_instance_uid, result.seg_storage_key = uid, key
        case OutputKind.SR:
            result.sr_sop_instance_uid, result.sr_storage_key = uid, key
        case OutputKind.SC:
            result.sc_sop_instance_uid, result.sc_storage_key = uid, key

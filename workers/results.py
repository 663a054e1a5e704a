"""Persist one analysis: DICOM outputs into storage, the Result row, and the delivery outbox.

All in one transaction so a crash leaves either nothing (the job is retried) or everything; the
outputs' UIDs are deterministic, so a retry rewrites the same objects rather than adding copies.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

from pydicom.dataset import Dataset
from sqlalchemy import delete, select

from service.core.db import session_scope
from service.core.models import Delivery, DeliveryState, Job, JobState, Result
from service.core.settings import Settings
from service.core.storage import ObjectStore
from workers.domain import Analysis


def _store_dataset(ds: Dataset, store: ObjectStore) -> str:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    key, _sha, _size = store.put_bytes([buf.getvalue()])
    return key


def build_output_datasets(source: Dataset, analysis: Analysis, settings: Settings) -> list[Dataset]:
    """SEG and SR always; the burned-in overlay SC when enabled (it needs the frames decoded again)."""
    from workers.write_dicom.build import OutputOptions, build_outputs

    frames = None
    if settings.overlay_sc:
        from workers.preprocess import decode_frames

        frames = decode_frames(source)
    return build_outputs(
        source, analysis, frames_rgb=frames, options=OutputOptions(uid_root=settings.uid_root)
    )


def save_result(
    job_id: int, analysis: Analysis, source: Dataset, *, settings: Settings, store: ObjectStore
) -> list[int] | None:
    """Write outputs and rows; returns the IDs of deliveries to send now, None if the job was
    cancelled (or deleted) while it ran and nothing was kept."""
    outputs = build_output_datasets(source, analysis, settings)
    stored = [(ds, _store_dataset(ds, store)) for ds in outputs]
    f = analysis.findings
    with session_scope(settings.db_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.state == JobState.CANCELLED:
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
        )
        for ds, key in stored:
            kind = _kind(ds)
            setattr(result, f"{kind}_sop_instance_uid", str(ds.SOPInstanceUID))
            setattr(result, f"{kind}_storage_key", key)
        session.add(result)
        job.state = JobState.SUCCEEDED
        job.finished_at = datetime.now(UTC)
        job.model_version = analysis.model.version
        job.timings_ms = {k: round(v, 1) for k, v in analysis.timings_ms.items()}
        session.flush()
        destination = settings.destination_for(job.instance.calling_ae)
        delivery_ids: list[int] = []
        if destination is not None:
            for ds, key in stored:
                if (
                    _kind(ds) == "sc"
                    and settings.overlay_sc_destinations
                    and (destination.ae_title not in settings.overlay_sc_destinations)
                ):
                    continue
                uid = str(ds.SOPInstanceUID)
                existing = session.scalar(
                    select(Delivery).where(
                        Delivery.destination == str(destination), Delivery.sop_instance_uid == uid
                    )
                )
                if existing is not None:
                    existing.result_id = result.id
                    if existing.state == DeliveryState.DELIVERED:
                        continue  # identical deterministic object already in PACS
                    existing.state = DeliveryState.PENDING
                    existing.storage_key = key
                    delivery_ids.append(existing.id)
                    continue
                d = Delivery(
                    result_id=result.id,
                    destination=str(destination),
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=uid,
                    storage_key=key,
                    state=DeliveryState.PENDING,
                )
                session.add(d)
                session.flush()
                delivery_ids.append(d.id)
    return delivery_ids


def _kind(ds: Dataset) -> str:
    modality = str(ds.get("Modality", ""))
    if modality == "SEG":
        return "seg"
    if modality == "SR":
        return "sr"
    return "sc"

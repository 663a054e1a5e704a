"""Persist one analysis: DICOM outputs and previews into storage, the Result row, and the delivery outbox.

All in one transaction so a crash leaves either nothing (the job is retried) or everything; the
outputs' UIDs are deterministic, so a retry rewrites the same objects rather than adding copies.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from sqlalchemy import delete, update

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


#: What copying a malformed source header into the outputs raises: pydicom's BytesLengthException
#: (a value whose length does not fit its VR) and NotImplementedError (an unknown VR) besides the
#: usual ValueError/TypeError/AttributeError/KeyError of a wrong or missing value.
SOURCE_VALUE_ERRORS = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    NotImplementedError,
    BytesLengthException,
)


def build_result_outputs(source: Dataset, analysis: Analysis, settings: Settings) -> list[Output]:
    """SEG and SR always; the burned-in overlay SC when enabled (it needs the frames decoded again)."""
    from workers.preprocess import InputError
    from workers.write_dicom.build import OutputOptions, build_outputs
    from workers.write_dicom.validate import OutputValidationError

    frames = None
    if settings.overlay_sc:
        from workers.preprocess import decode_frames

        frames = decode_frames(source)
    try:
        return build_outputs(
            source, analysis, frames_rgb=frames, options=OutputOptions(uid_root=settings.uid_root)
        )
    except InputError:
        raise
    except (*SOURCE_VALUE_ERRORS, OutputValidationError) as exc:
        # The source's header values (a date like '20!6', a missing Type 2 attribute, a value that
        # does not fit its VR) cannot be carried into valid outputs: the same on every attempt, so
        # not retried. The message of ``exc`` may quote those values (a patient's name), so only
        # its type is kept, and no traceback is logged (found by bench/chaos/fuzz.py).
        raise InputError(
            f"the source's header cannot be carried into valid SEG/SR outputs ({type(exc).__name__})"
        ) from exc


@dataclass(frozen=True)
class Saved:
    """A saved result: its row, the deliveries to send now, and its SEG (for the previews)."""

    result_id: int
    delivery_ids: list[int]
    seg: Dataset | None


def save_result(job_id: int, analysis: Analysis, source: Dataset, *, runtime: Runtime) -> Saved | None:
    """Write outputs and rows; None if the job was cancelled (or deleted) while it ran and nothing
    was kept. Previews come after, with :func:`save_previews`, once the deliveries are on their way."""
    settings, store = runtime.settings, runtime.store
    outputs = build_result_outputs(source, analysis, settings)
    stored = [(o, _store_dataset(o.dataset, store)) for o in outputs]
    f = analysis.findings
    seg = next((o.dataset for o in outputs if o.kind == OutputKind.SEG), None)
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
                    study_uid=str(output.dataset.StudyInstanceUID),
                )
                if delivery_id is not None:  # None: the identical object is already in PACS
                    delivery_ids.append(delivery_id)
        result_id = result.id
    return Saved(result_id, delivery_ids, seg)


def save_previews(
    result_id: int, analysis: Analysis, source: Dataset, seg: Dataset | None, *, runtime: Runtime
) -> None:
    """Render the previews of a saved result and record their keys (or why there are none).

    Called after the SEG and SR are on their way to PACS: rendering a cine costs about as much as
    building its SEG, and no reader should wait for the REST API's pictures. Until then the API
    answers 404 for the previews of this result.
    """
    previews = store_previews(
        runtime.store,
        source,
        seg,
        Caption.of(analysis),
        key_frame=analysis.findings.key_frame,
        settings=runtime.settings,
    )
    with runtime.db.session() as session:
        session.execute(
            update(Result)
            .where(Result.id == result_id)
            .values(
                preview_png_key=previews.png,
                preview_gif_key=previews.gif,
                preview_webp_key=previews.webp,
                preview_error=previews.error,
            )
        )


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

"""Persist one analysis: DICOM outputs and previews into storage, the Result row, and the delivery outbox.

All in one transaction so a crash leaves either nothing (the job is retried) or everything; the
outputs' UIDs are deterministic, so a retry rewrites the same objects rather than adding copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from sqlalchemy import delete, update

from service.core import lifecycle
from service.core.dicom import OutputKind
from service.core.logs import ctx
from service.core.models import Job, Result
from service.core.profiles import ViewerProfile
from service.core.runtime import Runtime
from service.core.settings import Settings
from workers.domain import Analysis, timed
from workers.write_dicom.previews import Caption, store_previews

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from workers.write_dicom.build import Output


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


def build_result_outputs(
    source: Dataset,
    analysis: Analysis,
    settings: Settings,
    timings: dict[str, float] | None = None,
    profile: ViewerProfile | None = None,
) -> list[tuple[Output, bytes]]:
    """SEG and SR always, in the encoding and shape of ``profile`` (the destination's; default:
    the global settings'); the burned-in overlay SC when the profile asks for it (it needs the
    frames decoded again); each with its Part 10 file, encoded once: the bytes validated are the
    bytes stored and sent.

    ``timings`` gets the milliseconds of ``build`` and ``validate`` (the job records them: they
    cost more than the analysis on small cines).
    """
    from workers.preprocess import InputError
    from workers.write_dicom.build import OutputOptions, build_outputs, seg_options
    from workers.write_dicom.validate import OutputValidationError, encode, validate_outputs

    timings = {} if timings is None else timings
    profile = profile or settings.profile_for(None)
    seg = seg_options(profile.seg_encoding, int(source.Rows), int(source.Columns))

    frames = None
    if profile.overlay_sc:
        from workers.preprocess import decode_frames

        frames = decode_frames(source)
    try:
        with timed(timings, "build"):
            outputs = build_outputs(
                source,
                analysis,
                frames_rgb=frames,
                options=OutputOptions(
                    uid_root=settings.uid_root, seg=seg, sr_shape=profile.sr_shape, validate=False
                ),
            )
            encoded = [encode(o.dataset) for o in outputs]
        with timed(timings, "validate"):
            inline = settings.output_validation == "inline"
            validate_outputs(source, [o.dataset for o in outputs], encoded=encoded, tools=inline)
        return list(zip(outputs, encoded, strict=True))
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
    """A saved result: its row and the deliveries to send now."""

    result_id: int
    delivery_ids: list[int]


def save_result(
    job_id: int,
    analysis: Analysis,
    source: Dataset,
    *,
    runtime: Runtime,
    attempt: lifecycle.Attempt | None = None,
) -> Saved | None:
    """Write outputs and rows; None if the job was cancelled (or deleted) while it ran and nothing
    was kept, or, with ``attempt`` (the task's claim), if the job is no longer under that claim (its
    worker was declared lost and the job went to another). Previews come after, with
    :func:`save_previews`, once the deliveries are on their way."""
    settings, store = runtime.settings, runtime.store
    timings = dict(analysis.timings_ms)
    with runtime.db.session() as session:
        job = session.get(Job, job_id)
        destination = settings.destination_for(job.instance.calling_ae) if job is not None else None
    built = build_result_outputs(source, analysis, settings, timings, settings.profile_for(destination))
    with timed(timings, "store"):
        stored = [(o, store.put_bytes([data])[0]) for o, data in built]
    f = analysis.findings
    with runtime.db.session() as session:
        won = lifecycle.succeed(
            session, job_id, model_version=analysis.model.version, timings_ms=timings, attempt=attempt
        )
        job = session.get(Job, job_id)
        if not won or job is None:
            return None  # cancelled or taken over while running: keep nothing, send nothing
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
            output_audit="inline" if settings.output_validation == "inline" else None,
        )
        for output, key in stored:
            _record(result, output, key)
        session.add(result)
        session.flush()
        delivery_ids: list[int] = []
        if destination is not None:
            for output, key in stored:
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
    return Saved(result_id, delivery_ids)


def audit_outputs_of(result_id: int, *, runtime: Runtime) -> str | None:
    """dicom3tools on a result's stored outputs, after their deliveries were queued
    (LUSAI_OUTPUT_VALIDATION=background); records and returns "passed" or "failed", None when
    there is nothing to audit (inline validation already ran them, or the result is gone).

    The outputs passed the in-process conformance check before they were stored; a failure here
    is a class of error that check misses: logged (checks and counts, never the tools' messages,
    which may quote patient data) and kept on the result for the REST API.
    """
    from workers.write_dicom.validate import audit_outputs

    with runtime.db.session() as session:
        r = session.get(Result, result_id)
        if r is None or r.output_audit is not None:
            return None
        source_key = r.job.instance.storage_key
        keys = [k for k in (r.seg_storage_key, r.sr_storage_key, r.sc_storage_key) if k]
    source = pydicom.dcmread(runtime.store.path(source_key), stop_before_pixels=True)
    results = audit_outputs(source, [runtime.store.path(k).read_bytes() for k in keys])
    failed = [r for r in results if not r.ok]
    outcome = "failed" if failed else "passed"
    detail = "; ".join(f"{r.check} {r.subject}: {len(r.errors)} error(s)" for r in failed)[:200] or None
    with runtime.db.session() as session:
        session.execute(
            update(Result)
            .where(Result.id == result_id)
            .values(output_audit=outcome, output_audit_detail=detail)
        )
    if failed:
        log.error(
            "output audit failed: dicom3tools refuse a stored output",
            extra=ctx(result_id=result_id, detail=detail),
        )
    return outcome


def save_previews(result_id: int, *, runtime: Runtime) -> bool:
    """Render the previews of a saved result from its stored source and SEG, and record their keys
    (or why there are none); False when the result is gone (re-analysed or deleted meanwhile).

    Its own task, queued behind the result's deliveries: rendering a cine costs about as much as
    building its SEG, and neither PACS nor the next job should wait for the REST API's pictures.
    Until it has run the API answers 404 for the previews of this result.
    """
    with runtime.db.session() as session:
        r = session.get(Result, result_id)
        if r is None:
            return False
        source_key, seg_key, key_frame = r.job.instance.storage_key, r.seg_storage_key, r.key_frame
        caption = Caption(r.score, f"{r.model_name} {r.model_version}", r.ungradable_reason)
    source = pydicom.dcmread(runtime.store.path(source_key))
    seg = pydicom.dcmread(runtime.store.path(seg_key)) if seg_key else None
    previews = store_previews(
        runtime.store, source, seg, caption, key_frame=key_frame, settings=runtime.settings
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
    return True


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

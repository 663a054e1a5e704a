"""Response and request bodies. Field descriptions end up in docs/openapi.json for integrators."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from service.core.models import DeliveryState, InstanceState, JobState

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp the API returns is explicit UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


def _iso_only(value: object) -> object:
    """Query timestamps must be ISO 8601: pydantic would read '-407' as a Unix time."""
    if isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit():
        raise ValueError("expected an ISO 8601 date-time")
    return value


#: A query parameter timestamp (ISO 8601; naive values are taken as UTC).
IsoDateTime = Annotated[datetime, BeforeValidator(_iso_only)]

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


def from_row(schema: type[M], row: object, /, **values: Any) -> M:
    """``schema`` from ``row``'s attributes of the same names; ``values`` give the fields it lacks.

    Response bodies mostly repeat a table's columns: naming each one again is how copies drift.
    """
    return schema.model_validate(
        {name: values[name] if name in values else getattr(row, name) for name in schema.model_fields},
        from_attributes=True,  # nested bodies from objects too
    )


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next page (null: last page)."""

    items: list[T]
    next_cursor: str | None = Field(description="Opaque cursor of the next page; null on the last page.")
    limit: int


class SeriesOut(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    zone: str | None = Field(description="Lung zone derived from the series description (see docs/api.md).")
    instance_count: int
    created_at: UtcDateTime


class StudyOut(BaseModel):
    study_instance_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None = Field(description="DICOM StudyDate as YYYY-MM-DD.")
    study_description: str | None
    series_count: int
    instance_count: int
    created_at: UtcDateTime


class StudyDetail(StudyOut):
    series: list[SeriesOut]


class JobSummary(BaseModel):
    id: int
    state: JobState
    model_version: str | None


class InstanceOut(BaseModel):
    sop_instance_uid: str
    version: int = Field(
        description="1 for the first copy; a resend of the UID with other bytes adds a version."
    )
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    frames: int
    rows: int | None
    columns: int | None
    calling_ae: str | None
    received_at: UtcDateTime
    size_bytes: int
    sha256: str
    state: InstanceState
    ignore_reason: str | None
    latest_job: JobSummary | None
    score: int | None = Field(
        description="Video score of the latest result of this version; null without a result or when the"
        " cine is not gradable."
    )


class JobOut(BaseModel):
    id: int
    sop_instance_uid: str
    instance_version: int
    state: JobState
    attempts: int
    error: str | None
    model_version: str | None
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage (decode, infer, score, write...)."
    )
    worker: str | None
    created_at: UtcDateTime
    enqueued_at: UtcDateTime | None
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    result_id: int | None


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
        description="Model version to analyse with; default the worker's current model.",
    )
    version: int | None = Field(None, ge=1, description="Instance version to analyse; default the latest.")


class ModelOut(BaseModel):
    name: str
    version: str
    weights_sha256: str
    package_sha256: str | None = Field(
        None, description="SHA-256 of the model package's manifest (null for results from before packages)."
    )


class ResultLinks(BaseModel):
    seg: str | None
    sr: str | None
    preview_png: str
    cine_gif: str
    cine_webp: str


class ResultSummary(BaseModel):
    id: int
    job_id: int
    sop_instance_uid: str
    instance_version: int
    score: int | None = Field(description="Video score (0-3) by the 1% rule; null when not gradable.")
    gradable: bool = Field(
        description="false: the cine cannot be graded (no probe contact, noise, pleura not visible...)."
    )
    reason: str | None = Field(
        description="Why it is not gradable: too-few-frames, no-contact, noise, rib-shadow or no-pleura"
        " (null when gradable; measurements.ungradable_detail gives the measured values)."
    )
    key_frame: int = Field(description="0-based index of the frame that carries the score.")
    b_line_fraction: float
    b_line_count: int
    consolidation: bool
    effusion: bool
    model: ModelOut
    created_at: UtcDateTime


class ResultOut(ResultSummary):
    series_instance_uid: str
    study_instance_uid: str
    frame_scores: list[int] = Field(description="Score of every frame, in frame order.")
    measurements: dict[str, Any] = Field(
        description="All video and per-frame measurements (mm, mm², fractions)."
    )
    seg_sop_instance_uid: str | None
    sr_sop_instance_uid: str | None
    sc_sop_instance_uid: str | None
    output_audit: Literal["inline", "passed", "failed"] | None = Field(
        description="dicom3tools (dciodvfy, dcentvfy) on the outputs: 'inline' (before they were stored),"
        " 'passed' or 'failed' (audited after delivery; every output passed lusai's in-process"
        " conformance check before it was stored), null while that audit is pending."
    )
    output_audit_detail: str | None = Field(description="Which checks failed and how many errors.")
    links: ResultLinks


class ZoneInstance(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    result_id: int
    score: int | None = Field(description="null: the clip is not gradable.")
    gradable: bool
    reason: str | None = Field(description="Why the clip is not gradable (see ResultSummary.reason).")


class ZoneScore(BaseModel):
    zone: str
    score: int | None = Field(
        description="Maximum video score of the zone's gradable clips; null when none of them is gradable."
    )
    gradable: bool = Field(description="At least one clip of the zone is gradable.")
    instances: list[ZoneInstance]


class UnzonedInstance(ZoneInstance):
    series_description: str | None


class StudyResults(BaseModel):
    study_instance_uid: str
    zones: list[ZoneScore]
    total_score: int = Field(
        description="Sum over graded zones of the zone maxima (clips without a zone excluded). Zones that"
        " are missing or not gradable add nothing: check complete before reading it as the patient total."
    )
    zones_expected: list[str]
    missing_zones: list[str]
    not_gradable_zones: list[str] = Field(
        description="Zones with results whose clips are all not gradable (they add nothing to the total)."
    )
    complete: bool = Field(description="Every expected zone has a gradable, scored clip.")
    unzoned: list[UnzonedInstance] = Field(description="Scored clips whose series description names no zone.")
    pending: int = Field(description="Analysed-or-queued clips of the study without a result yet.")


class DeliveryOut(BaseModel):
    id: int
    result_id: int | None
    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    state: DeliveryState
    attempts: int
    next_attempt_at: UtcDateTime | None
    last_error: str | None
    created_at: UtcDateTime
    delivered_at: UtcDateTime | None


class DestinationOut(BaseModel):
    destination: str
    counts: dict[str, int] = Field(description="Deliveries by state.")
    last_delivered_at: UtcDateTime | None


class UploadOut(BaseModel):
    outcome: Literal["queued", "ignored", "duplicate"]
    sop_instance_uid: str
    version: int
    job_id: int | None
    reason: str | None


class AuditOut(BaseModel):
    id: int
    at: UtcDateTime
    principal: str
    auth_method: str
    action: str
    route: str
    resource: str
    query_keys: str | None
    status: int
    request_id: str
    client: str | None


#: Free text without control characters other than tab and line breaks (PostgreSQL refuses NUL).
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


class ReviewIn(BaseModel):
    """A reader's own score of the clip; the model's result is never changed by it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    score: int | None = Field(
        None, ge=0, le=3, description="The reader's Soldati score (0-3); null only with gradable=false."
    )
    gradable: bool = Field(True, description="false: the clip cannot be scored (then score is null).")
    a_lines: bool | None = Field(None, description="A-lines seen (null: not stated).")
    b_lines: bool | None = Field(None, description="B-lines seen (null: not stated).")
    pleura_irregular: bool | None = Field(None, description="Irregular or thickened pleural line.")
    consolidation: bool | None = Field(None, description="Subpleural or lobar consolidation.")
    effusion: bool | None = Field(None, description="Pleural effusion.")
    comments: str | None = Field(
        None,
        max_length=2000,
        pattern=TEXT_PATTERN,
        description="Free text; it goes into the labels export, so no patient identifiers.",
    )

    @model_validator(mode="after")
    def _score_iff_gradable(self) -> ReviewIn:
        if self.gradable and self.score is None:
            raise ValueError("a gradable clip needs a score (0-3)")
        if not self.gradable and self.score is not None:
            raise ValueError("a clip that is not gradable has no score")
        return self


class ReviewOut(BaseModel):
    id: int
    result_id: int
    sop_instance_uid: str
    instance_version: int
    reviewer: str = Field(description="The API key or token subject that recorded the review.")
    score: int | None
    gradable: bool
    a_lines: bool | None
    b_lines: bool | None
    pleura_irregular: bool | None
    consolidation: bool | None
    effusion: bool | None
    comments: str | None
    created_at: UtcDateTime
    model: ModelOut = Field(description="The model of the reviewed result.")
    model_score: int | None = Field(description="The reviewed result's score (null: not graded).")


class AgreementStats(BaseModel):
    n: int = Field(description="Counted (result, reviewer) pairs.")
    kappa_quadratic: float = Field(description="Cohen's kappa with quadratic weights.")
    exact: float = Field(description="Fraction of pairs with the same score.")
    within_one: float = Field(description="Fraction of pairs at most one level apart.")
    confusion: list[list[int]] = Field(description="4x4 counts; rows: reviewer score, columns: model score.")


class PackageAgreementOut(BaseModel):
    model: ModelOut
    package_sha256: str | None = Field(description="SHA-256 of the model package, where recorded.")
    reviewed_results: int
    reviewers: int
    reviews: int = Field(description="Counted reviews: the latest of each (result, reviewer).")
    not_gradable_by_model: int
    not_gradable_by_reviewer: int
    graded: AgreementStats | None = Field(description="Pairs that both model and reviewer scored.")
    ungradable_as_zero: AgreementStats | None = Field(
        description="All pairs, with 'not gradable' on either side counted as score 0."
    )


class AgreementOut(BaseModel):
    packages: list[PackageAgreementOut]


# --- list filters: the query parameters of each list (FastAPI reads them as ``Annotated[F, Query()]``) ---
# A parameter left out is None and filters nothing. Field order is the order in docs/openapi.json.

OptUid = Annotated[str | None, Field(pattern=UID_PATTERN, max_length=64)]
OptName = Annotated[str | None, Field(max_length=64)]
OptAe = Annotated[str | None, Field(max_length=16)]
CreatedFrom = Annotated[IsoDateTime | None, Field(description="Created at or after (ISO 8601).")]
CreatedTo = Annotated[IsoDateTime | None, Field(description="Created before (ISO 8601).")]


class StudyFilter(BaseModel):
    patient_id: OptName = None
    accession_number: OptName = None
    date_from: date | None = Field(None, description="Study date on or after (YYYY-MM-DD).")
    date_to: date | None = Field(None, description="Study date on or before (YYYY-MM-DD).")
    calling_ae: str | None = Field(None, max_length=16, description="Has an instance from this AE.")
    job_state: JobState | None = Field(None, description="Has a job in this state.")
    score_min: int | None = Field(None, ge=0, le=3, description="Has a result scoring at least this.")
    score_max: int | None = Field(None, ge=0, le=3, description="Has a result scoring at most this.")


class SeriesFilter(BaseModel):
    study_instance_uid: OptUid = None
    modality: OptAe = None
    zone: str | None = Field(None, max_length=16, description="Only series of this lung zone (e.g. R1).")


class InstanceFilter(BaseModel):
    study_instance_uid: OptUid = None
    series_instance_uid: OptUid = None
    patient_id: OptName = None
    accession_number: OptName = None
    calling_ae: OptAe = None
    state: InstanceState | None = None
    received_from: IsoDateTime | None = Field(None, description="Received at or after (ISO 8601)")
    received_to: IsoDateTime | None = Field(None, description="Received before (ISO 8601).")


class JobFilter(BaseModel):
    state: JobState | None = None
    sop_instance_uid: OptUid = None
    model_version: OptName = None
    created_from: CreatedFrom = None
    created_to: CreatedTo = None


class ResultFilter(BaseModel):
    score_min: int | None = Field(
        None, ge=0, le=3, description="Score at least this (not gradable results never match)."
    )
    score_max: int | None = Field(
        None, ge=0, le=3, description="Score at most this (not gradable results never match)."
    )
    gradable: bool | None = Field(None, description="false: only results whose cine could not be graded.")
    model_version: OptName = None
    created_from: CreatedFrom = None
    created_to: CreatedTo = None
    study_instance_uid: OptUid = None
    sop_instance_uid: OptUid = None
    consolidation: bool | None = None
    effusion: bool | None = None


class DeliveryFilter(BaseModel):
    state: DeliveryState | None = None
    destination: str | None = Field(None, max_length=128, description="AET@host:port")
    sop_instance_uid: str | None = Field(
        None, pattern=UID_PATTERN, max_length=64, description="UID of the delivered SEG/SR/SC."
    )
    result_id: int | None = Field(None, ge=1, le=2**62)


class ReviewFilter(BaseModel):
    """Of the review lists and of the agreement."""

    reviewer: str | None = Field(
        None, max_length=160, pattern=TEXT_PATTERN, description="Only this reviewer (principal)."
    )
    model_version: str | None = Field(None, max_length=64, pattern=TEXT_PATTERN)
    since: IsoDateTime | None = Field(None, description="Reviews recorded at or after (ISO 8601).")


class AuditFilter(BaseModel):
    principal: str | None = Field(None, max_length=160)
    resource_prefix: str | None = Field(None, max_length=512, description="Path prefix, e.g. a study URL.")
    at_from: IsoDateTime | None = Field(None, description="At or after (ISO 8601).")
    at_to: IsoDateTime | None = Field(None, description="Before (ISO 8601).")

"""SQLAlchemy 2 models: the data's path from a received instance to results and deliveries.

PHI is limited to what the API must show (patient ID, accession number, study date); it is stored
here and never logged. Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class InstanceState(enum.StrEnum):
    """Why an instance is (or is not) analysed."""

    ACCEPTED = "accepted"  # lung ultrasound, a job was queued
    IGNORED = "ignored"  # stored, but routing says it is not for us
    DUPLICATE = "duplicate"  # same UID and bytes as an earlier copy


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    RETRYING = "retrying"
    DEAD = "dead"  # gave up after the configured attempts; re-send by hand
    WAITING = "waiting"  # behind an older output of the same study to the same destination


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_studies_patient_id", "patient_id"),
        Index("ix_studies_accession", "accession_number"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    """One received object version. The same SOP Instance UID with other bytes is a new version."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    frames: Mapped[int] = mapped_column(Integer, default=1)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    storage_key: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState, "instance_state"))
    ignore_reason: Mapped[str | None] = mapped_column(String(128))

    series: Mapped[Series] = relationship(back_populates="instances")
    jobs: Mapped[list[Job]] = relationship(back_populates="instance", cascade="all, delete-orphan")

    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_uid_sha"),
        UniqueConstraint("sop_instance_uid", "version", name="uq_instance_uid_version"),
    )


class Job(Base):
    """One analysis of one instance version by one model version."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64))
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    worker: Mapped[str | None] = mapped_column(String(128))  # host:pid of the process that claimed it
    # The registry's name of the worker that claimed it (Celery node name, ``Worker.name``): a job
    # of a lost worker goes back on the queue at once (0009; None: claimed outside a worker).
    worker_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    instance: Mapped[Instance] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(back_populates="job", cascade="all, delete-orphan")


class Result(Base):
    """What a successful job found, and where its DICOM outputs are."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    score: Mapped[int | None] = mapped_column(Integer, index=True)  # None: not gradable
    gradable: Mapped[bool] = mapped_column(default=True, server_default=true(), index=True)
    ungradable_reason: Mapped[str | None] = mapped_column(String(32))  # gradability reason code
    frame_scores: Mapped[list[Any]] = mapped_column(JSON, default=list)
    key_frame: Mapped[int] = mapped_column(Integer, default=0)
    b_line_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    b_line_count: Mapped[int] = mapped_column(Integer, default=0)
    consolidation: Mapped[bool] = mapped_column(default=False)
    effusion: Mapped[bool] = mapped_column(default=False)
    measurements: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    model_package_sha256: Mapped[str | None] = mapped_column(String(64))  # None: before model packages
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    seg_storage_key: Mapped[str | None] = mapped_column(String(128))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_storage_key: Mapped[str | None] = mapped_column(String(128))
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sc_storage_key: Mapped[str | None] = mapped_column(String(128))
    # Previews the worker rendered next to the SEG (the API only serves them). All NULL: analysed
    # before previews were stored (0006); preview_error: the worker could not render them.
    preview_png_key: Mapped[str | None] = mapped_column(String(128))
    preview_gif_key: Mapped[str | None] = mapped_column(String(128))
    preview_webp_key: Mapped[str | None] = mapped_column(String(128))
    preview_error: Mapped[str | None] = mapped_column(String(200))
    # dicom3tools on the stored outputs: "inline" (before they were stored), "passed" or "failed"
    # (after delivery, LUSAI_OUTPUT_VALIDATION=background), None while that audit is pending.
    output_audit: Mapped[str | None] = mapped_column(String(16))
    output_audit_detail: Mapped[str | None] = mapped_column(String(200))  # checks and counts only
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    job: Mapped[Job] = relationship(back_populates="result")


class Review(Base):
    """A reader's own score for a result: kept beside the model's output, never overwriting it.

    Rows are history: the latest per (result, reviewer) is the one that counts. ``score`` is null
    exactly when the reader said the clip is not gradable.
    """

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    reviewer: Mapped[str] = mapped_column(String(160), index=True)  # the API principal's name
    score: Mapped[int | None] = mapped_column(Integer)
    gradable: Mapped[bool] = mapped_column(default=True)
    a_lines: Mapped[bool | None] = mapped_column()
    b_lines: Mapped[bool | None] = mapped_column()
    pleura_irregular: Mapped[bool | None] = mapped_column()
    consolidation: Mapped[bool | None] = mapped_column()
    effusion: Mapped[bool | None] = mapped_column()
    comments: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Delivery(Base):
    """Outbox row: one output object to one destination; the deliver task drains these."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="SET NULL"), index=True)
    destination: Mapped[str] = mapped_column(String(128), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(128))
    # Outputs of one study reach a destination in the order they were made (None: before 0007).
    study_uid: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_delivery_dest_uid"),
        Index("ix_deliveries_destination_study", "destination", "study_uid"),
    )


class Worker(Base):
    """A Celery worker of the deployment, as it registered itself and last said it was alive.

    Written only by :mod:`service.core.registry`: the worker's main process registers at start,
    heartbeats every ``LUSAI_HEARTBEAT_INTERVAL`` and marks itself stopped on a clean shutdown;
    its pool processes count the jobs they finish. Its running jobs are the jobs whose
    ``worker_name`` is its name.
    """

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # Celery node name, name@host
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)  # the worker's main process
    queues: Mapped[list[Any]] = mapped_column(JSON, default=list)
    device: Mapped[str] = mapped_column(String(16))  # cpu | cuda
    gpu_name: Mapped[str | None] = mapped_column(String(128))
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    version: Mapped[str] = mapped_column(String(64))  # lusai's
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # clean shutdown
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0)


class ApiKey(Base):
    """An API key of the REST API. Only a SHA-256 of the secret is stored (see ``service.api.auth``).

    The secret is 256 random bits, so a fast hash is enough: there is nothing to brute-force that a
    slow KDF would protect, and verification stays cheap on every request.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), unique=True)  # public part of the key, for look-up
    secret_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    rate_limit: Mapped[int | None] = mapped_column(
        Integer
    )  # requests/minute; None: the default, 0: unlimited
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who read or changed what, when, with which outcome. Written for every authenticated API call.

    ``resource`` is the request path (UIDs and IDs, no query string), so patient IDs used as search
    filters are not copied here; ``query_keys`` names the filters used without their values.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    principal: Mapped[str] = mapped_column(String(160), index=True)
    auth_method: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(String(128))
    resource: Mapped[str] = mapped_column(String(512))
    query_keys: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))

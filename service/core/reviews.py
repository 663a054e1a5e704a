"""Readers' reviews of results: which review counts, model-reader agreement, the labels export.

A review is a reader's own Soldati score of a clip, kept beside the model's result and never
written into it. Reviews are history: per (result, reviewer) only the latest counts. The export
is what ``lusai adapt --labels`` reads, so a site can re-adapt the model from its readers' scores;
it carries a keyed pseudonym instead of the Patient ID (adaptation only needs to group by patient).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from service.core.agreement import Agreement, agreement
from service.core.models import Instance, Result, Review, Series, Study
from service.core.settings import Settings
from service.core.study import graded_score

#: Columns of the labels CSV, as tools/blus_to_dicom.py writes them (without its file column).
LABEL_COLUMNS = ("sop_instance_uid", "score", "a_lines", "b_lines", "patient_id", "comments")
PSEUDONYM_KEY_FILE = "pseudonym.key"


# --- agreement (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderAgreement:
    """Model vs. reader over counted reviews; a score of None means "not gradable" on that side."""

    reviews: int
    not_gradable_by_model: int
    not_gradable_by_reviewer: int
    graded: Agreement | None  # pairs both sides scored; None when there are none
    ungradable_as_zero: Agreement | None  # every pair, "not gradable" on either side counted as 0


def reader_agreement(pairs: Sequence[tuple[int | None, int | None]]) -> ReaderAgreement:
    """Agreement of (model score, reader score) pairs; confusion rows are the reader, columns the model.

    A clip the model or the reader would not grade is no disagreement about a score, so the headline
    numbers leave it out and count it; ``ungradable_as_zero`` keeps the number comparable with model
    versions that always scored (they called an unreadable clip 0).
    """
    graded = [(m, r) for m, r in pairs if m is not None and r is not None]
    return ReaderAgreement(
        reviews=len(pairs),
        not_gradable_by_model=sum(m is None for m, _ in pairs),
        not_gradable_by_reviewer=sum(r is None for _, r in pairs),
        graded=_agreement(graded),
        ungradable_as_zero=_agreement([(m or 0, r or 0) for m, r in pairs]),
    )


def _agreement(pairs: Sequence[tuple[int, int]]) -> Agreement | None:
    if not pairs:
        return None
    model, reader = np.array(pairs, dtype=int).T
    return agreement(expert=reader, model=model)


# --- queries ------------------------------------------------------------------------------------


def counted_reviews(*, since: datetime | None = None, reviewer: str | None = None) -> Select[int]:
    """IDs of the reviews that count: the latest per (result, reviewer)."""
    stmt = select(func.max(Review.id))
    if since is not None:
        stmt = stmt.where(Review.created_at >= since)
    if reviewer is not None:
        stmt = stmt.where(Review.reviewer == reviewer)
    return stmt.group_by(Review.result_id, Review.reviewer)


@dataclass(frozen=True)
class PackageKey:
    model_name: str
    model_version: str
    weights_sha256: str
    package_sha256: str | None


@dataclass(frozen=True)
class PackageAgreement:
    package: PackageKey
    reviewed_results: int
    reviewers: int
    agreement: ReaderAgreement


def agreement_by_package(
    session: Session,
    *,
    since: datetime | None = None,
    reviewer: str | None = None,
    model_version: str | None = None,
) -> list[PackageAgreement]:
    """Model-reader agreement per model package, over the latest review of each (result, reviewer)."""
    stmt = (
        select(
            Review.result_id,
            Review.reviewer,
            Review.score,
            Review.gradable,
            Result.score,
            Result.model_name,
            Result.model_version,
            Result.weights_sha256,
            Result.gradable,
            Result.model_package_sha256,
        )
        .join(Result, Review.result_id == Result.id)
        .where(Review.id.in_(counted_reviews(since=since, reviewer=reviewer)))
        .order_by(Review.id)
    )
    if model_version is not None:
        stmt = stmt.where(Result.model_version == model_version)
    groups: dict[PackageKey, list[tuple[int, str, int | None, int | None]]] = {}
    for rid, who, r_score, r_gradable, m_score, name, version, sha, m_gradable, pkg in session.execute(stmt):
        key = PackageKey(name, version, sha, pkg)
        reader = r_score if r_gradable and r_score is not None else None
        groups.setdefault(key, []).append((rid, who, graded_score(m_score, m_gradable), reader))
    out = []
    for key in sorted(
        groups, key=lambda k: (k.model_name, k.model_version, k.weights_sha256, k.package_sha256 or "")
    ):
        rows = groups[key]
        out.append(
            PackageAgreement(
                package=key,
                reviewed_results=len({r[0] for r in rows}),
                reviewers=len({r[1] for r in rows}),
                agreement=reader_agreement([(m, r) for _, _, m, r in rows]),
            )
        )
    return out


# --- labels export ------------------------------------------------------------------------------


def pseudonym_key(settings: Settings) -> bytes:
    """The site's pseudonym key: ``LUSAI_PSEUDONYM_KEY``, else a random one kept in the data folder
    (created on first use, readable by the service account only), so pseudonyms are stable per site."""
    if settings.pseudonym_key is not None and settings.pseudonym_key.get_secret_value():
        return settings.pseudonym_key.get_secret_value().encode()
    path = settings.data_dir / PSEUDONYM_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    return Path(path).read_text().strip().encode()


def pseudonym(patient_id: str | None, key: bytes) -> str:
    """First 16 hex digits of HMAC-SHA-256(key, Patient ID): stable, not reversible without the key."""
    if not patient_id:
        return ""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


def _yes_no(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "no"


@dataclass(frozen=True)
class LabelExport:
    rows: list[dict[str, str]]
    not_gradable: int  # instances whose latest review says "not gradable": left out


def label_rows(
    session: Session,
    key: bytes,
    *,
    since: datetime | None = None,
    model_version: str | None = None,
) -> LabelExport:
    """One labels row per SOP instance: its latest review, whichever result (model run) it was made on,
    so a re-analysis does not drop the readers' labels. Instances whose latest review is "not gradable"
    are left out (the labels file has no score to give them) and counted."""
    latest = (
        select(func.max(Review.id))
        .join(Instance, Review.instance_id == Instance.id)
        .join(Result, Review.result_id == Result.id)
        .group_by(Instance.sop_instance_uid)
    )
    if since is not None:
        latest = latest.where(Review.created_at >= since)
    if model_version is not None:
        latest = latest.where(Result.model_version == model_version)
    stmt = (
        select(Review, Instance.sop_instance_uid, Study.patient_id)
        .join(Instance, Review.instance_id == Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Review.id.in_(latest))
        .order_by(Instance.sop_instance_uid)
    )
    rows: list[dict[str, str]] = []
    skipped = 0
    for review, uid, patient_id in session.execute(stmt):
        if not review.gradable or review.score is None:
            skipped += 1
            continue
        rows.append(
            {
                "sop_instance_uid": uid,
                "score": str(review.score),
                "a_lines": _yes_no(review.a_lines),
                "b_lines": _yes_no(review.b_lines),
                "patient_id": pseudonym(patient_id, key),
                "comments": review.comments or "",
            }
        )
    return LabelExport(rows=rows, not_gradable=skipped)


def write_labels(path: Path, rows: Iterable[dict[str, str]]) -> None:
    """Write the CSV next to its target and rename it into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)

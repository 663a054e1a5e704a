"""Lung zones and the study total: which clip counts for a zone, and what the patient total means.

BLUS/BLUE-protocol cines are labelled per zone in the Series Description ("LUS R1" .. "LUS L3").
``LUSAI_ZONE_MAP`` (exact descriptions, case-insensitive) wins over ``LUSAI_ZONE_PATTERN`` (a
regex with groups ``side`` and ``number``), so sites with their own naming need no code change.

A clip's score is the latest result of its latest version; a zone's score is the maximum over its
gradable clips; the total is the sum of the zone scores (Soldati). A zone whose clips are all not
gradable has no score and, like a missing zone, leaves the total incomplete. Everything here is
pure: the API reads the rows and shapes the response, these functions decide what they mean.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TypeVar

from service.core.models import InstanceState
from service.core.settings import Settings


class ZoneRule:
    """Series description -> lung zone (``R1`` .. ``L3``), and the zones a complete examination has."""

    def __init__(self, pattern: str, mapping: dict[str, str], expected: Sequence[str] = ()) -> None:
        self.regex = re.compile(pattern)
        if not {"side", "number"} <= set(self.regex.groupindex):
            raise ValueError("LUSAI_ZONE_PATTERN needs the named groups 'side' and 'number'")
        self.mapping = {k.strip().upper(): v.strip().upper() for k, v in mapping.items()}
        self.expected = [z.upper() for z in expected]

    @classmethod
    def from_settings(cls, settings: Settings) -> ZoneRule:
        return cls(settings.zone_pattern, settings.zone_map, settings.zones_expected)

    def zone(self, description: str | None) -> str | None:
        if not description:
            return None
        mapped = self.mapping.get(description.strip().upper())
        if mapped:
            return mapped
        m = self.regex.search(description)
        if m is None:
            return None
        return f"{m.group('side').upper()}{m.group('number')}"


def graded_score(score: int | None, gradable: bool | None) -> int | None:
    """The score a result shows: none when the cine could not be graded.

    The one rule for stored results, in the API and the reviews' agreement (the worker's
    ``VideoFindings.reported_score`` says the same of a fresh analysis);
    ``gradable`` None is a row from before gradability was recorded, which was always graded.
    """
    return None if score is None or gradable is False else int(score)


T = TypeVar("T")
K = TypeVar("K")


def latest_by(rows: Iterable[T], group: Callable[[T], K], rank: Callable[[T], int]) -> dict[K, T]:
    """The row of highest ``rank`` in each ``group``, whatever the order of ``rows``."""
    latest: dict[K, T] = {}
    for row in rows:
        cur = latest.get(key := group(row))
        if cur is None or rank(row) > rank(cur):
            latest[key] = row
    return latest


def latest_versions(instances: Iterable[T]) -> dict[str, T]:
    """SOP Instance UID -> its highest version (a resend with other bytes adds a version).

    Rows need ``sop_instance_uid`` and ``version``: ORM instances or column rows alike.
    """
    return latest_by(instances, attrgetter("sop_instance_uid"), attrgetter("version"))


def latest_results(results: Iterable[T]) -> dict[int, T]:
    """Instance id -> its latest result (highest id): a re-run replaces what the clip shows.

    Rows need ``id`` and ``instance_id``.
    """
    return latest_by(results, attrgetter("instance_id"), attrgetter("id"))


@dataclass(frozen=True, slots=True)
class Clip:
    """One SOP instance of a study at its latest version, with that version's latest result.

    The result fields are those of a result summary; ``result_id`` None: no result yet.
    """

    sop_instance_uid: str
    series_instance_uid: str
    series_description: str | None
    state: InstanceState
    result_id: int | None = None
    score: int | None = None  # None: no result, or not gradable (see graded_score)
    gradable: bool = False
    reason: str | None = None  # why it is not gradable


@dataclass(frozen=True, slots=True)
class ZoneTotal:
    zone: str
    score: int | None  # the maximum over the gradable clips; None when none is gradable
    instances: list[Clip]  # the zone's clips with results

    @property
    def gradable(self) -> bool:
        return self.score is not None


@dataclass(frozen=True, slots=True)
class StudyTotal:
    """The study-level reading; field names are those of the API's StudyResults."""

    zones: list[ZoneTotal]  # zones with results, by name
    total_score: int  # sum of the zone scores: check ``complete`` before reading it as the patient total
    zones_expected: list[str]
    missing_zones: list[str]  # expected zones without any result
    not_gradable_zones: list[str]  # zones with results, none of them gradable
    complete: bool  # every expected zone has a gradable, scored clip
    unzoned: list[Clip]  # clips with results whose series description names no zone
    pending: int  # accepted clips without a result yet (queued or being analysed)


def zone_total(zone: str, clips: list[Clip]) -> ZoneTotal:
    """The maximum over the zone's gradable clips; no score when none of them is gradable."""
    scores = [c.score for c in clips if c.score is not None]
    return ZoneTotal(zone=zone, score=max(scores) if scores else None, instances=clips)


def study_total(clips: Iterable[Clip], rule: ZoneRule) -> StudyTotal:
    """Zone scores and the total over ``clips`` (one per SOP instance); clips come out in UID order."""
    zones: dict[str, list[Clip]] = defaultdict(list)
    unzoned: list[Clip] = []
    pending = 0
    for clip in sorted(clips, key=lambda c: c.sop_instance_uid):
        if clip.result_id is None:
            pending += clip.state == InstanceState.ACCEPTED  # ignored clips are never analysed
            continue
        zone = rule.zone(clip.series_description)
        if zone is None:
            unzoned.append(clip)
        else:
            zones[zone].append(clip)
    totals = [zone_total(z, cs) for z, cs in sorted(zones.items())]
    missing = [z for z in rule.expected if z not in zones]
    not_gradable = [t.zone for t in totals if not t.gradable]
    return StudyTotal(
        zones=totals,
        total_score=sum(t.score or 0 for t in totals),
        zones_expected=list(rule.expected),
        missing_zones=missing,
        not_gradable_zones=not_gradable,
        complete=not missing and not any(z in not_gradable for z in rule.expected),
        unzoned=unzoned,
        pending=pending,
    )

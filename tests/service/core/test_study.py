"""The scoring rules of a study: zone of a series, the clip that counts, zone scores and the total."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from service.core.models import InstanceState
from service.core.settings import Settings
from service.core.study import (
    Clip,
    ZoneRule,
    graded_score,
    latest_results,
    latest_versions,
    study_total,
    zone_total,
)

PATTERN = r"(?i)\bLUS[\s_-]*(?P<side>[LR])[\s_-]*(?P<number>[1-6])\b"
SIX = ["R1", "R2", "R3", "L1", "L2", "L3"]


def clip(uid: str, description: str | None, score: int | None = None, *, gradable: bool = True,
         result_id: int | None = 1, state: InstanceState = InstanceState.ACCEPTED) -> Clip:  # fmt: skip
    if result_id is None:
        return Clip(uid, f"{uid}.0", description, state)
    reason = None if gradable else "no-contact"
    return Clip(
        uid, f"{uid}.0", description, state, result_id, graded_score(score, gradable), gradable, reason
    )


def test_zone_map_wins_over_the_pattern_and_expected_zones_are_upper_case() -> None:
    rule = ZoneRule(PATTERN, {" basal left ": "l3"}, expected=["r1", "L3"])
    assert rule.zone("Basal LEFT") == "L3"
    assert rule.zone("lus r2") == "R2"
    assert rule.zone("LUS R7") is None and rule.zone("") is None and rule.zone(None) is None
    assert rule.expected == ["R1", "L3"]


def test_zone_rule_from_settings(tmp_path: Path) -> None:
    rule = ZoneRule.from_settings(
        Settings(data_dir=tmp_path, zone_map={"Front": "R1"}, zones_expected=["r1"])
    )
    assert rule.zone("front") == "R1" and rule.zone("LUS L2") == "L2" and rule.expected == ["R1"]


def test_pattern_without_side_and_number_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="side"):
        ZoneRule(r"LUS (\w)(\d)", {})


def test_a_result_that_could_not_be_graded_shows_no_score() -> None:
    assert graded_score(2, True) == 2
    assert graded_score(2, False) is None
    assert graded_score(None, False) is None


@dataclass(frozen=True)
class Version:
    sop_instance_uid: str
    version: int


@dataclass(frozen=True)
class Res:
    id: int
    instance_id: int


def test_latest_version_of_each_sop_instance_whatever_the_row_order() -> None:
    rows = [Version("1.1", 1), Version("1.2", 1), Version("1.1", 3), Version("1.1", 2)]
    assert latest_versions(rows) == {"1.1": Version("1.1", 3), "1.2": Version("1.2", 1)}
    assert latest_versions([]) == {}


def test_latest_result_of_each_instance_is_the_highest_id() -> None:
    rows = [Res(7, 1), Res(3, 1), Res(5, 2), Res(9, 1)]
    assert latest_results(rows) == {1: Res(9, 1), 2: Res(5, 2)}


def test_zone_score_is_the_maximum_over_gradable_clips() -> None:
    z = zone_total(
        "R1", [clip("1", "LUS R1", 1), clip("2", "LUS R1", 3), clip("3", "LUS R1", gradable=False)]
    )
    assert z.score == 3 and z.gradable
    none = zone_total("R2", [clip("4", "LUS R2", gradable=False)])
    assert none.score is None and not none.gradable


def test_total_sums_zone_maxima_and_names_what_is_missing() -> None:
    rule = ZoneRule(PATTERN, {}, SIX)
    clips = [
        clip("5", "LUS R1", 1), clip("1", "LUS R1", 3), clip("2", "lus-l2", 2), clip("3", "LUS R3", 0),
        clip("4", "Other view", 3),
    ]  # fmt: skip
    t = study_total(clips, rule)
    assert [(z.zone, z.score) for z in t.zones] == [("L2", 2), ("R1", 3), ("R3", 0)]
    assert [c.sop_instance_uid for c in t.zones[1].instances] == ["1", "5"]  # clips in UID order
    assert t.total_score == 5  # the unzoned clip adds nothing
    assert [c.series_description for c in t.unzoned] == ["Other view"]
    assert t.missing_zones == ["R2", "L1", "L3"] and t.not_gradable_zones == [] and not t.complete
    assert t.zones_expected == SIX and t.pending == 0


def test_a_zone_with_no_gradable_clip_adds_nothing_and_leaves_the_total_incomplete() -> None:
    rule = ZoneRule(PATTERN, {}, ["R1", "L1"])
    t = study_total([clip("1", "LUS R1", 2), clip("2", "LUS L1", gradable=False)], rule)
    assert t.total_score == 2 and t.not_gradable_zones == ["L1"] and t.missing_zones == []
    assert not t.complete
    graded = study_total([clip("1", "LUS R1", 2), clip("2", "LUS L1", 0)], rule)
    assert graded.total_score == 2 and graded.complete


def test_an_unexpected_zone_that_is_not_gradable_does_not_make_the_total_incomplete() -> None:
    t = study_total(
        [clip("1", "LUS R1", 2), clip("2", "LUS L5", gradable=False)], ZoneRule(PATTERN, {}, ["R1"])
    )
    assert t.not_gradable_zones == ["L5"] and t.complete


def test_clips_without_a_result_are_pending_only_while_accepted() -> None:
    clips = [
        clip("1", "LUS R1", result_id=None),
        clip("2", "LUS R2", result_id=None, state=InstanceState.IGNORED),
        clip("3", "LUS R3", 1),
    ]
    t = study_total(clips, ZoneRule(PATTERN, {}, ["R1", "R3"]))
    assert t.pending == 1
    assert [z.zone for z in t.zones] == ["R3"] and t.missing_zones == ["R1"] and not t.complete


def test_no_clips_no_zones() -> None:
    t = study_total([], ZoneRule(PATTERN, {}))
    assert t.zones == [] and t.total_score == 0 and t.complete and t.pending == 0

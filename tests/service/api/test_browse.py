"""Studies, series, instances, results, jobs and deliveries over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.core.models import Delivery, DeliveryState, Job, JobState
from service.core.study import ZoneRule
from tests.service.api.conftest import Api, make_sqlite_api, seed_study


def _all_pages(api: Api, url: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        r = api.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination does not end")


def test_studies_filters_and_pagination(api: Api, tmp_path: Path) -> None:
    a = seed_study(api, tmp_path, zones=[("LUS R1", 3)], patient_id="P-A", accession="ACC-A",
                   study_date="20260103", calling_ae="US_ROOM1", with_seg=False)  # fmt: skip
    b = seed_study(api, tmp_path, zones=[("LUS L1", 0)], patient_id="P-B", accession="ACC-B",
                   study_date="20260110", calling_ae="US_ROOM2", with_seg=False)  # fmt: skip
    c = seed_study(api, tmp_path, zones=[("LUS L2", 1)], patient_id="P-A", accession="ACC-C",
                   study_date="20260120", calling_ae="US_ROOM1", with_seg=False)  # fmt: skip

    def uids(**params: Any) -> list[str]:
        return [s["study_instance_uid"] for s in _all_pages(api, "/api/v1/studies", limit=1, **params)]

    assert uids(sort="study_date") == [a.study_uid, b.study_uid, c.study_uid]
    assert uids(sort="-study_date") == [c.study_uid, b.study_uid, a.study_uid]
    assert set(uids()) == {a.study_uid, b.study_uid, c.study_uid}
    assert uids(patient_id="P-A", sort="study_date") == [a.study_uid, c.study_uid]
    assert uids(accession_number="ACC-B") == [b.study_uid]
    assert uids(date_from="2026-01-05", date_to="2026-01-15") == [b.study_uid]
    assert uids(calling_ae="US_ROOM2") == [b.study_uid]
    assert uids(score_min=2) == [a.study_uid]
    assert set(uids(score_max=1)) == {b.study_uid, c.study_uid}
    assert set(uids(job_state="succeeded")) == {a.study_uid, b.study_uid, c.study_uid}
    assert uids(job_state="failed") == []
    first = api.get("/api/v1/studies", params={"limit": 1, "sort": "study_date"}).json()
    assert first["items"][0]["study_date"] == "2026-01-03"
    assert first["items"][0]["series_count"] == 1 and first["items"][0]["instance_count"] == 1
    bad = api.get("/api/v1/studies", params={"cursor": first["next_cursor"], "sort": "-created_at"})
    assert bad.status_code == 400 and bad.json()["type"] == "urn:lusai:problem:invalid-cursor"
    assert api.get("/api/v1/studies", params={"cursor": "!!!"}).status_code == 400
    assert api.get("/api/v1/studies", params={"sort": "patient_id"}).status_code == 422
    assert api.get("/api/v1/studies", params={"limit": 0}).status_code == 422


def test_study_detail_series_and_instances(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 2), ("LUS L3", 1), ("Other view", 0)], with_seg=False)
    detail = api.get(f"/api/v1/studies/{s.study_uid}").json()
    assert [x["zone"] for x in detail["series"]] == ["R1", "L3", None]
    assert detail["instance_count"] == 3
    assert api.get("/api/v1/studies/1.2.3.4.5").status_code == 404
    series = _all_pages(api, "/api/v1/series", study_instance_uid=s.study_uid, limit=2, sort="series_number")
    assert [x["series_description"] for x in series] == ["LUS R1", "LUS L3", "Other view"]
    one = api.get(f"/api/v1/series/{series[1]['series_instance_uid']}").json()
    assert one["zone"] == "L3" and one["study_instance_uid"] == s.study_uid
    assert [x["zone"] for x in api.get("/api/v1/series", params={"zone": "r1"}).json()["items"]] == ["R1"]
    inst = _all_pages(api, "/api/v1/instances", study_instance_uid=s.study_uid, limit=2, sort="received_at")
    assert [i["sop_instance_uid"] for i in inst] == s.sop_uids
    assert inst[0]["score"] == 2 and inst[0]["latest_job"]["state"] == "succeeded"
    assert _all_pages(api, "/api/v1/instances", calling_ae="NOPE") == []
    assert len(_all_pages(api, "/api/v1/instances", patient_id="PAT-1", state="accepted")) == 3
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert _all_pages(api, "/api/v1/instances", received_from=future) == []
    d = api.get(f"/api/v1/instances/{s.sop_uids[0]}").json()
    assert (
        d["version"] == 1
        and d["frames"] == 4
        and d["series_instance_uid"] == series[0]["series_instance_uid"]
    )
    assert api.get(f"/api/v1/instances/{s.sop_uids[0]}", params={"version": 2}).status_code == 404


def test_study_zone_scores_and_total(api: Api, tmp_path: Path) -> None:
    s = seed_study(
        api, tmp_path, zones=[("LUS R1", 1), ("LUS R1", 3), ("lus-l2", 2), ("LUS R3", 0), ("Other view", 3)],
        with_seg=False,
    )  # fmt: skip
    body = api.get(f"/api/v1/studies/{s.study_uid}/results").json()
    zones = {z["zone"]: z for z in body["zones"]}
    assert {z: v["score"] for z, v in zones.items()} == {"R1": 3, "L2": 2, "R3": 0}
    assert len(zones["R1"]["instances"]) == 2
    assert body["total_score"] == 5  # max per zone summed; the unzoned clip is excluded
    assert [u["series_description"] for u in body["unzoned"]] == ["Other view"]
    assert body["missing_zones"] == ["R2", "L1", "L3"] and body["complete"] is False
    assert body["pending"] == 0
    assert api.get("/api/v1/studies/1.2.3/results").status_code == 404


def test_zone_rule() -> None:
    rule = ZoneRule(
        r"(?i)\bLUS[\s_-]*(?P<side>[LR])[\s_-]*(?P<number>[1-6])\b", {"Lung anterior right": "R1"}
    )
    descriptions = ("LUS L1", "lus_r3", "LUS R 2", "LUS L7", "CHEST", None, "lung ANTERIOR right")
    assert [rule.zone(d) for d in descriptions] == [
        "L1", "R3", "R2", None, None, None, "R1"
    ]  # fmt: skip
    with pytest.raises(ValueError):
        ZoneRule(r"LUS (\w)", {})


def test_zone_map_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> None:
    gen = make_sqlite_api(
        sqlite_template, tmp_path, monkeypatch,
        zone_map="Anterior upper right=R1,Basal left=L3", zones_expected="R1,L3",
    )  # fmt: skip
    api = next(gen)
    s = seed_study(api, tmp_path, zones=[("Anterior upper right", 2), ("basal LEFT", 1)], with_seg=False)
    body = api.get(f"/api/v1/studies/{s.study_uid}/results").json()
    assert body["total_score"] == 3 and body["complete"] is True and body["zones_expected"] == ["R1", "L3"]
    gen.close()


def test_results_list_and_detail(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[(f"LUS R{i % 3 + 1}", i % 4) for i in range(7)], with_seg=False)
    everything = _all_pages(api, "/api/v1/results", limit=3)
    assert [r["id"] for r in everything] == sorted(s.result_ids, reverse=True)
    high = _all_pages(api, "/api/v1/results", score_min=2, limit=2, sort="score")
    assert [r["score"] for r in high] == [2, 2, 3]
    assert all(r["model"]["version"] == "1.0.0" for r in high)
    assert len(_all_pages(api, "/api/v1/results", study_instance_uid=s.study_uid, consolidation=True)) == 1
    assert _all_pages(api, "/api/v1/results", model_version="9.9") == []
    assert len(_all_pages(api, "/api/v1/results", sop_instance_uid=s.sop_uids[2])) == 1
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert len(_all_pages(api, "/api/v1/results", created_from=past)) == 7
    detail = api.get(f"/api/v1/results/{s.result_ids[3]}").json()
    assert detail["score"] == 3 and detail["frame_scores"] == [3, 2, 0, 3]
    assert detail["measurements"]["bla_score"] == 0.5 and detail["study_instance_uid"] == s.study_uid
    assert detail["links"]["seg"] is None and detail["links"]["preview_png"].endswith("/preview.png")
    by_instance = api.get(f"/api/v1/instances/{s.sop_uids[3]}/result").json()
    assert by_instance == detail
    assert (
        api.get(f"/api/v1/instances/{s.sop_uids[3]}/result", params={"model_version": "2"}).status_code == 404
    )
    assert api.get("/api/v1/results/999999").status_code == 404


def test_jobs_rerun_and_cancel(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    uid = s.sop_uids[0]
    jobs = api.get("/api/v1/jobs", params={"sop_instance_uid": uid}).json()["items"]
    assert len(jobs) == 1 and jobs[0]["timings_ms"] == {"decode": 12.5, "infer": 80.0, "write": 5.0}
    assert jobs[0]["result_id"] == s.result_ids[0]
    r = api.post(f"/api/v1/instances/{uid}/jobs", json={"model_version": "2.0.0"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["model_version"] == "2.0.0" and job["result_id"] is None
    queued = list((api.settings.broker_dir / "queue").glob("*"))
    assert queued, "the job was not sent to the broker"
    with api.session() as sess:
        row = sess.get(Job, job["id"])
        assert row is not None and row.enqueued_at is not None
    conflict = api.post(f"/api/v1/instances/{uid}/jobs", json={})
    assert conflict.status_code == 409 and conflict.json()["type"] == "urn:lusai:problem:job-active"
    assert api.post(f"/api/v1/instances/{uid}/jobs", json={"model_version": "../etc"}).status_code == 422
    assert api.post("/api/v1/instances/1.2.3.4/jobs", json={}).status_code == 404
    assert [j["state"] for j in api.get("/api/v1/jobs", params={"state": "queued"}).json()["items"]] == [
        "queued"
    ]
    cancelled = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 409
    assert api.get(f"/api/v1/jobs/{job['id']}").json()["finished_at"] is not None
    assert api.get("/api/v1/jobs/424242").status_code == 404


SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.33"


def test_deliveries(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    now = datetime.now(UTC)
    with api.session() as sess:
        rows = [
            Delivery(result_id=s.result_ids[0], destination="PACS@10.0.0.5:104", sop_class_uid=SEG,
                     sop_instance_uid="1.2.3.1", storage_key="k", state=DeliveryState.DELIVERED, attempts=1,
                     delivered_at=now),
            Delivery(result_id=s.result_ids[0], destination="PACS@10.0.0.5:104", sop_class_uid=SR,
                     sop_instance_uid="1.2.3.2", storage_key="k", state=DeliveryState.DEAD, attempts=5,
                     last_error="association rejected"),
            Delivery(result_id=s.result_ids[0], destination="VNA@10.0.0.9:11112", sop_class_uid=SEG,
                     sop_instance_uid="1.2.3.1", storage_key="k", state=DeliveryState.SENDING, attempts=1),
        ]  # fmt: skip
        sess.add_all(rows)
        sess.flush()
        dead_id, sending_id = rows[1].id, rows[2].id
    listed = _all_pages(api, "/api/v1/deliveries", destination="PACS@10.0.0.5:104", limit=1)
    assert {d["state"] for d in listed} == {"delivered", "dead"}
    assert [d["id"] for d in _all_pages(api, "/api/v1/deliveries", state="dead")] == [dead_id]
    assert len(_all_pages(api, "/api/v1/deliveries", result_id=s.result_ids[0])) == 3
    dest = {d["destination"]: d for d in api.get("/api/v1/destinations").json()}
    assert dest["PACS@10.0.0.5:104"]["counts"] == {"delivered": 1, "dead": 1}
    assert dest["PACS@10.0.0.5:104"]["last_delivered_at"] is not None
    assert dest["VNA@10.0.0.9:11112"]["counts"] == {"sending": 1}
    r = api.post(f"/api/v1/deliveries/{dead_id}/resend")
    assert r.status_code == 202 and r.json()["state"] == "pending" and r.json()["attempts"] == 0
    assert r.json()["last_error"] is None
    with api.session() as sess:
        assert sess.scalar(select(Delivery.state).where(Delivery.id == dead_id)) == DeliveryState.PENDING
    assert api.post(f"/api/v1/deliveries/{sending_id}/resend").status_code == 409
    assert api.post(f"/api/v1/deliveries/{dead_id}/resend", scope="read").status_code == 403
    assert api.get(f"/api/v1/deliveries/{dead_id}").json()["destination"] == "PACS@10.0.0.5:104"
    assert api.get("/api/v1/deliveries/987654").status_code == 404


def test_timestamps_are_utc(api: Api, tmp_path: Path) -> None:
    seed_study(api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    item = api.get("/api/v1/results").json()["items"][0]
    assert item["created_at"].endswith(("Z", "+00:00"))
    job = api.get("/api/v1/jobs").json()["items"][0]
    assert job["state"] == JobState.SUCCEEDED.value and job["created_at"].endswith(("Z", "+00:00"))

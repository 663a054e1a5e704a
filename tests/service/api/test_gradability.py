"""Results that are not gradable over HTTP: score null, gradable false and the reason, in lists,
filters, sorting, the study's zone totals and previews; on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from service.core.header import read_header
from service.core.ingest import index_object
from tests.factories import noise_cine_file
from tests.service.api.conftest import Api, seed_study
from workers.pipeline import Analyzer
from workers.results import save_result


def _all_pages(api: Api, url: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        r = api.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination does not end")


def test_not_gradable_result_is_served_without_a_score(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", None), ("LUS R2", 2), ("LUS L1", 0)])
    detail = api.get(f"/api/v1/results/{s.result_ids[0]}").json()
    assert (detail["score"], detail["gradable"], detail["reason"]) == (None, False, "no-pleura")
    graded = api.get(f"/api/v1/results/{s.result_ids[1]}").json()
    assert (graded["score"], graded["gradable"], graded["reason"]) == (2, True, None)
    listed = {r["id"]: r for r in _all_pages(api, "/api/v1/results")}
    assert listed[s.result_ids[0]]["score"] is None and listed[s.result_ids[0]]["gradable"] is False
    # Filters: gradable, and score bounds never match a result without a score.
    assert [r["id"] for r in _all_pages(api, "/api/v1/results", gradable=False)] == [s.result_ids[0]]
    assert len(_all_pages(api, "/api/v1/results", gradable=True)) == 2
    assert {r["id"] for r in _all_pages(api, "/api/v1/results", score_max=3)} == set(s.result_ids[1:])
    # Sorting by score pages through the null (it sorts below 0) without losing or repeating rows.
    asc = _all_pages(api, "/api/v1/results", sort="score", limit=1)
    assert [r["score"] for r in asc] == [None, 0, 2]
    desc = _all_pages(api, "/api/v1/results", sort="-score", limit=1)
    assert [r["score"] for r in desc] == [2, 0, None]
    inst = api.get(f"/api/v1/instances/{s.sop_uids[0]}").json()
    assert inst["score"] is None
    assert api.get(f"/api/v1/instances/{s.sop_uids[0]}/result").json()["reason"] == "no-pleura"
    png = api.get(f"/api/v1/results/{s.result_ids[0]}/preview.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_zone_totals_say_which_zones_are_not_gradable(api: Api, tmp_path: Path) -> None:
    s = seed_study(
        api, tmp_path,
        zones=[("LUS R1", None), ("LUS R1", 1), ("LUS R2", None), ("LUS R3", 2), ("LUS L1", 0), ("LUS L2", 3),
               ("LUS L3", 1), ("Other view", None)],
        with_seg=False,
    )  # fmt: skip
    body = api.get(f"/api/v1/studies/{s.study_uid}/results").json()
    zones = {z["zone"]: z for z in body["zones"]}
    # R1 has one gradable clip: its score counts; R2 has none: no score, not a silent 0.
    assert (zones["R1"]["score"], zones["R1"]["gradable"]) == (1, True)
    assert (zones["R2"]["score"], zones["R2"]["gradable"]) == (None, False)
    assert [i["reason"] for i in zones["R2"]["instances"]] == ["no-pleura"]
    assert body["not_gradable_zones"] == ["R2"] and body["missing_zones"] == []
    assert body["total_score"] == 1 + 2 + 0 + 3 + 1 and body["complete"] is False
    assert body["unzoned"][0]["score"] is None and body["unzoned"][0]["gradable"] is False
    # Study search by score ignores clips without one.
    found = api.get("/api/v1/studies", params={"score_min": 3}).json()["items"]
    assert [x["study_instance_uid"] for x in found] == [s.study_uid]


def test_worker_saves_a_noise_cine_as_not_gradable(api: Api, tmp_path: Path) -> None:
    """The real pipeline and save_result: the row has no score, the reason, and the SR is stored."""
    f = noise_cine_file(tmp_path / "noise.dcm", frames=5, rows=160, cols=200)
    key, sha, size = api.store.put_file(f)
    header, _ = read_header(f)
    outcome = index_object(header, key, sha, size, calling_ae=None, ignore_reason=None, db=api.runtime.db)
    assert outcome.job_id is not None
    source = pydicom.dcmread(f)
    analysis = Analyzer(device="cpu").analyze(source)
    save_result(outcome.job_id, analysis, source, runtime=api.runtime)
    (result,) = _all_pages(api, "/api/v1/results", sop_instance_uid=str(source.SOPInstanceUID))
    assert (result["score"], result["gradable"], result["reason"]) == (None, False, "noise")
    detail = api.get(f"/api/v1/results/{result['id']}").json()
    assert detail["measurements"]["ungradable_detail"].startswith("speckle structure on 0%")
    assert detail["links"]["sr"] and detail["links"]["seg"]  # the SEG is still written
    sr = api.get(detail["links"]["sr"])
    assert sr.status_code == 200 and b"NOISE" in sr.content and b"LUSSCORE" not in sr.content

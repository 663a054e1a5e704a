"""Readers' reviews over REST: recorded beside the model's result, validated, audited, listed, and
model-reader agreement per model package checked against hand-computed kappa."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service.core.models import AuditEvent, Result, Review
from service.core.reviews import reader_agreement
from tests.service.api.conftest import Api, seed_study

REVIEWS = "/api/v1/results/{}/reviews"


def _principal(api: Api, scope: str) -> str:
    key_id = api.tokens[scope].split("_")[1]
    return f"key:{key_id}:test-{scope}"


def _review(api: Api, result_id: int, score: int | None, scope: str = "write", **extra: Any) -> Any:
    body = {"score": score, "gradable": score is not None, **extra}
    r = api.post(REVIEWS.format(result_id), scope=scope, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_review_is_recorded_beside_the_result_and_audited(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 1)], with_seg=False)
    rid = s.result_ids[0]
    before = api.get(f"/api/v1/results/{rid}").json()
    body = {"score": 3, "b_lines": True, "a_lines": False, "consolidation": True, "comments": "confluent"}
    r = api.post(REVIEWS.format(rid), json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == REVIEWS.format(rid)
    got = r.json()
    assert got["score"] == 3 and got["gradable"] is True and got["model_score"] == 1
    assert got["b_lines"] is True and got["a_lines"] is False and got["effusion"] is None
    assert got["reviewer"] == _principal(api, "write")
    assert got["sop_instance_uid"] == s.sop_uids[0] and got["model"]["version"] == "1.0.0"
    assert api.get(f"/api/v1/results/{rid}").json() == before  # the model's output is untouched
    with api.session() as db:
        row = db.scalars(select(Review)).one()
        assert (row.result_id, row.score, row.comments) == (rid, 3, "confluent")
        assert db.get(Result, rid).score == 1  # type: ignore[union-attr]
        audit = db.scalars(select(AuditEvent).where(AuditEvent.action == "POST")).all()
    assert [(a.route, a.resource, a.status, a.principal) for a in audit] == [
        ("/api/v1/results/{result_id}/reviews", REVIEWS.format(rid), 201, _principal(api, "write"))
    ]
    # by instance: the latest result of its latest version
    by_uid = api.post(f"/api/v1/instances/{s.sop_uids[0]}/reviews", json={"gradable": False})
    assert by_uid.status_code == 201 and by_uid.json()["result_id"] == rid
    assert by_uid.json()["score"] is None and by_uid.json()["gradable"] is False


@pytest.mark.parametrize(
    "body",
    [
        {"score": 4},
        {"score": -1},
        {},  # gradable by default, so it needs a score
        {"score": None, "gradable": True},
        {"score": 2, "gradable": False},
        {"score": "2"},
        {"score": True},
        {"score": 2.5},
        {"score": 2, "b_lines": "yes"},
        {"score": 2, "reviewer": "someone else"},
        {"score": 2, "comments": "x" * 2001},
        {"score": 2, "comments": "nul\x00byte"},
    ],
)
def test_invalid_bodies_are_422(sqlite_api: Api, tmp_path: Path, body: dict[str, Any]) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 1)], with_seg=False)
    r = sqlite_api.post(REVIEWS.format(s.result_ids[0]), json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    with sqlite_api.session() as db:
        assert db.scalars(select(Review)).all() == []


def test_scopes_and_unknown_targets(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 1)], with_seg=False)
    url = REVIEWS.format(s.result_ids[0])
    assert api.post(url, scope="read", json={"score": 1}).status_code == 403
    assert api.client.post(url, json={"score": 1}).status_code == 401
    assert api.post(REVIEWS.format(424242), json={"score": 1}).status_code == 404
    assert api.get(REVIEWS.format(424242)).status_code == 404
    assert api.post("/api/v1/instances/1.2.3.4/reviews", json={"score": 1}).status_code == 404
    with api.session() as db:
        assert db.scalars(select(Review)).all() == []
    assert api.get(url).json()["items"] == []


def test_list_filters_and_pagination(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 1), ("LUS R2", 2)], with_seg=False)
    a, b = s.result_ids
    first = _review(api, a, 0)
    second = _review(api, a, 1)
    third = _review(api, b, 2, scope="admin")
    page = api.get(REVIEWS.format(a), params={"limit": 1}).json()
    assert [r["id"] for r in page["items"]] == [second["id"]] and page["next_cursor"]
    rest = api.get(REVIEWS.format(a), params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [r["id"] for r in rest["items"]] == [first["id"]] and rest["next_cursor"] is None
    every = api.get("/api/v1/reviews", params={"sort": "id"}).json()["items"]
    assert [r["id"] for r in every] == [first["id"], second["id"], third["id"]]
    mine = api.get("/api/v1/reviews", params={"reviewer": _principal(api, "admin")}).json()["items"]
    assert [r["id"] for r in mine] == [third["id"]]
    assert api.get("/api/v1/reviews", params={"model_version": "9.9"}).json()["items"] == []
    assert api.get("/api/v1/reviews", params={"since": "2999-01-01T00:00:00"}).json()["items"] == []
    assert len(api.get("/api/v1/reviews", params={"since": "2000-01-01"}).json()["items"]) == 3
    assert api.get("/api/v1/reviews", params={"cursor": "garbage"}).status_code == 400


def test_reader_agreement_counts_not_gradable_apart() -> None:
    # (model, reader); None: not gradable on that side
    got = reader_agreement([(None, 2), (1, 1), (2, None), (None, None)])
    assert (got.reviews, got.not_gradable_by_model, got.not_gradable_by_reviewer) == (4, 2, 2)
    assert got.graded is not None and got.graded.n == 1 and got.graded.exact == 1.0
    assert got.ungradable_as_zero is not None and got.ungradable_as_zero.n == 4
    # as zero: (0, 2), (1, 1), (2, 0), (0, 0) -> exact 2/4, within one 2/4
    assert (got.ungradable_as_zero.exact, got.ungradable_as_zero.within_one) == (0.5, 0.5)
    assert got.ungradable_as_zero.confusion[2][0] == 1 and got.ungradable_as_zero.confusion[0][2] == 1
    empty = reader_agreement([])
    assert empty.graded is None and empty.ungradable_as_zero is None and empty.reviews == 0


def test_agreement_per_model_package(api: Api, tmp_path: Path) -> None:
    s = seed_study(
        api, tmp_path, zones=[("LUS R1", 0), ("LUS R2", 1), ("LUS R3", 2), ("LUS L1", 3), ("LUS L2", 1)],
        with_seg=False,
    )  # fmt: skip
    other = seed_study(api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    with api.session() as db:
        db.execute(update(Result).where(Result.id == other.result_ids[0]).values(model_version="2.0.0"))
    r0, r1, r2, r3, r4 = s.result_ids
    _review(api, r0, 0)
    _review(api, r1, 1)  # superseded by the next one: the latest per (result, reviewer) counts
    _review(api, r1, 2)
    _review(api, r2, 2)
    _review(api, r3, 3)
    _review(api, r4, None)  # not gradable
    _review(api, other.result_ids[0], 2)
    _review(api, other.result_ids[0], 3, scope="admin")

    body = api.get("/api/v1/agreement").json()
    assert [p["model"]["version"] for p in body["packages"]] == ["1.0.0", "2.0.0"]
    v1, v2 = body["packages"]
    assert v1["model"] == {
        "name": "lusnet",
        "version": "1.0.0",
        "weights_sha256": "ab" * 32,
        "package_sha256": None,
    }
    assert (v1["reviewed_results"], v1["reviewers"], v1["reviews"]) == (5, 1, 5)
    assert (v1["not_gradable_by_model"], v1["not_gradable_by_reviewer"]) == (0, 1)
    # Pairs (reader, model): (0,0) (2,1) (2,2) (3,3). Weighted disagreement observed: 1/9; expected
    # from marginals reader (1,0,2,1), model (1,1,1,1): sum r_i m_j (i-j)^2 / (9 n) = 40/36.
    # kappa = 1 - (1/9) / (40/36) = 0.9
    assert v1["graded"] == {
        "n": 4,
        "kappa_quadratic": 0.9,
        "exact": 0.75,
        "within_one": 1.0,
        "confusion": [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]],
    }
    # With the not-gradable review as reader 0 vs model 1: observed 2/9, expected 62/45,
    # kappa = 1 - (2/9) / (62/45) = 1 - 90/558 = 0.8387
    assert v1["ungradable_as_zero"]["n"] == 5
    assert v1["ungradable_as_zero"]["kappa_quadratic"] == pytest.approx(0.8387, abs=1e-4)
    assert (v1["ungradable_as_zero"]["exact"], v1["ungradable_as_zero"]["within_one"]) == (0.6, 1.0)
    # Two readers on one result: (2,2) and (3,2); all model scores alike, so the expected
    # disagreement equals the observed one: kappa 0.
    assert (v2["reviewed_results"], v2["reviewers"], v2["reviews"]) == (1, 2, 2)
    assert v2["graded"]["kappa_quadratic"] == 0.0 and v2["graded"]["exact"] == 0.5

    only_v2 = api.get("/api/v1/agreement", params={"model_version": "2.0.0"}).json()["packages"]
    assert only_v2 == [v2]
    admin = api.get("/api/v1/agreement", params={"reviewer": _principal(api, "admin")}).json()["packages"]
    assert [(p["model"]["version"], p["reviews"]) for p in admin] == [("2.0.0", 1)]
    assert api.get("/api/v1/agreement", params={"since": "2999-01-01"}).json() == {"packages": []}
    assert api.get("/api/v1/agreement", params={"since": "-407"}).status_code == 422


def test_agreement_counts_model_not_gradable(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 1), ("LUS R2", 2), ("LUS R3", 0)], with_seg=False)
    r1, r2, r3 = s.result_ids
    with api.session() as db:
        db.execute(update(Result).where(Result.id == r3).values(score=None, gradable=False))
    _review(api, r1, 1)
    _review(api, r2, 3)
    assert _review(api, r3, 2)["model_score"] is None
    (pkg,) = api.get("/api/v1/agreement").json()["packages"]
    assert (pkg["reviews"], pkg["not_gradable_by_model"], pkg["not_gradable_by_reviewer"]) == (3, 1, 0)
    # graded pairs (reader, model): (1,1) (3,2); observed 1/9, expected (0 + 1 + 4 + 1)/9 / 2 = 1/3
    assert pkg["graded"]["n"] == 2 and pkg["graded"]["kappa_quadratic"] == pytest.approx(2 / 3, abs=1e-4)
    # as zero, the model's ungraded clip is (2, 0): exact 1/3, within one 2/3
    assert pkg["ungradable_as_zero"]["n"] == 3
    assert pkg["ungradable_as_zero"]["exact"] == pytest.approx(1 / 3, abs=1e-4)
    assert pkg["ungradable_as_zero"]["within_one"] == pytest.approx(2 / 3, abs=1e-4)

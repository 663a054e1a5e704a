"""`lusai reviews export`: the adapt-ready labels CSV from readers' reviews, with pseudonymous patients."""

from __future__ import annotations

import csv
import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from service.cli import app
from service.core.models import Job, JobState, Result
from tests.service.api.conftest import Api, make_api, seed_study
from tests.service.conftest import database_url

REVIEWS = "/api/v1/results/{}/reviews"
PATIENT = "PAT-SECRET-4711"


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    yield from make_api(database_url(request, request.param, tmp_path), tmp_path, monkeypatch)


def _review(api: Api, result_id: int, body: dict[str, object]) -> None:
    r = api.post(REVIEWS.format(result_id), json=body)
    assert r.status_code == 201, r.text


def _export(out: Path, *args: str) -> tuple[str, list[dict[str, str]]]:
    result = CliRunner().invoke(app, ["reviews", "export", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        return result.output, list(csv.DictReader(fh))


def _rerun(api: Api, result_id: int) -> None:
    """A second analysis of the same instance, as a re-run by another model version leaves it."""
    with api.session() as s:
        old = s.get(Result, result_id)
        assert old is not None
        job = Job(instance_id=old.instance_id, state=JobState.SUCCEEDED, model_version="2.0.0")
        s.add(job)
        s.flush()
        s.add(Result(job_id=job.id, instance_id=old.instance_id, score=0, model_name="lusnet",
                     model_version="2.0.0", weights_sha256="cd" * 32))  # fmt: skip


def test_export_labels(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = seed_study(
        api, tmp_path, zones=[("LUS R1", 1), ("LUS R2", 2), ("LUS R3", 0)], patient_id=PATIENT,
        with_seg=False,
    )  # fmt: skip
    other = seed_study(api, tmp_path, zones=[("LUS L1", 3)], patient_id="PAT-OTHER", with_seg=False)
    r1, r2, r3 = s.result_ids
    _review(api, r1, {"score": 1, "a_lines": True})
    _review(api, r1, {"score": 2, "a_lines": False, "b_lines": True, "comments": 'irregular, "thick"'})
    _review(api, r2, {"score": 3})
    _review(api, r3, {"score": None, "gradable": False})
    _review(api, other.result_ids[0], {"score": 3, "b_lines": True})
    _rerun(api, r1)  # a later result without reviews: the label stays

    out = tmp_path / "labels.csv"
    output, rows = _export(out)
    assert "wrote 3 labels" in output and "1 not gradable left out" in output
    text = out.read_text()
    assert text.splitlines()[0] == "sop_instance_uid,score,a_lines,b_lines,patient_id,comments"
    assert PATIENT not in text and "PAT-OTHER" not in text
    key = (api.settings.data_dir / "pseudonym.key").read_text().strip().encode()
    pid = hmac.new(key, PATIENT.encode(), hashlib.sha256).hexdigest()[:16]
    other_pid = hmac.new(key, b"PAT-OTHER", hashlib.sha256).hexdigest()[:16]
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    assert set(by_uid) == {s.sop_uids[0], s.sop_uids[1], other.sop_uids[0]}
    assert by_uid[s.sop_uids[0]] == {
        "sop_instance_uid": s.sop_uids[0], "score": "2", "a_lines": "no", "b_lines": "yes",
        "patient_id": pid, "comments": 'irregular, "thick"',
    }  # fmt: skip
    assert by_uid[s.sop_uids[1]] == {
        "sop_instance_uid": s.sop_uids[1], "score": "3", "a_lines": "", "b_lines": "",
        "patient_id": pid, "comments": "",
    }  # fmt: skip
    assert by_uid[other.sop_uids[0]]["patient_id"] == other_pid != pid

    assert _export(out)[1] == rows  # stable pseudonyms: the key is kept in the data folder
    assert _export(out, "--model-version", "2.0.0")[1] == []  # reviews were made on 1.0.0 results
    assert len(_export(out, "--model-version", "1.0.0")[1]) == 3
    assert _export(out, "--since", "2999-01-01")[1] == []
    assert len(_export(out, "--since", datetime.now(UTC).date().isoformat())[1]) == 3

    monkeypatch.setenv("LUSAI_PSEUDONYM_KEY", "site-secret")  # each command reads the environment
    keyed = _export(out)[1]
    assert {r["patient_id"] for r in keyed} == {
        hmac.new(b"site-secret", p.encode(), hashlib.sha256).hexdigest()[:16] for p in (PATIENT, "PAT-OTHER")
    }
    with api.session() as db:
        assert db.scalars(select(Result.score).where(Result.id == r1)).one() == 1  # model output as it was


def test_export_problems(tmp_path: Path, api: Api) -> None:
    bad = CliRunner().invoke(app, ["reviews", "export", "--out", str(tmp_path / "l.csv"), "--since", "soon"])
    assert bad.exit_code == 2 and "ISO 8601" in bad.output
    missing = CliRunner().invoke(app, ["reviews", "export", "--out", str(tmp_path / "nope" / "l.csv")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = CliRunner().invoke(app, ["reviews", "export", "--out", str(tmp_path / "l.csv")])
    assert empty.exit_code == 0 and (tmp_path / "l.csv").read_text().strip() == (
        "sop_instance_uid,score,a_lines,b_lines,patient_id,comments"
    )


def test_reviews_list(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 1)], with_seg=False)
    _review(api, s.result_ids[0], {"score": 2})
    _review(api, s.result_ids[0], {"score": None, "gradable": False})
    result = CliRunner().invoke(app, ["reviews", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "not gradable" in result.output and "test-write" in result.output

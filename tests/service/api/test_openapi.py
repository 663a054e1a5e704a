"""The committed spec is current and complete, and a schemathesis run against it finds no 500s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.api.openapi import OUTPUT, render
from tests.service.api.conftest import Api, make_api, seed_study
from tests.service.conftest import database_url


def test_committed_spec_is_current() -> None:
    assert OUTPUT.is_file(), "docs/openapi.json missing: python -m service.api.openapi"
    assert OUTPUT.read_text() == render(), "docs/openapi.json is stale: run python -m service.api.openapi"


def test_spec_documents_auth_and_errors() -> None:
    spec = json.loads(OUTPUT.read_text())
    assert set(spec["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            public = not path.startswith("/api/")
            assert bool(op.get("security")) != public, f"{method} {path}: security {op.get('security')}"
            assert op.get("summary"), f"{method} {path} has no summary"
            if not public:
                for status in ("401", "403", "422", "429"):
                    content = op["responses"][status]["content"]
                    assert "application/problem+json" in content, f"{method} {path} {status}"
    upload = spec["paths"]["/api/v1/instances"]["post"]["requestBody"]["content"]
    assert set(upload) == {"application/dicom", "multipart/form-data"}
    seg = spec["paths"]["/api/v1/results/{result_id}/seg"]["get"]["responses"]["200"]["content"]
    assert list(seg) == ["application/dicom"]
    assert (
        "image/png"
        in spec["paths"]["/api/v1/results/{result_id}/preview.png"]["get"]["responses"]["200"]["content"]
    )


# --- schemathesis -------------------------------------------------------------------------------

EXAMPLES = 12
#: Schema-valid but meaningless input is a 4xx here by design (an opaque cursor that was never issued,
#: an application/dicom body that is not DICOM), which this check counts as "valid data rejected".
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fuzz_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Seeded app per backend: PostgreSQL is stricter about types and lengths than SQLite."""
    tmp = tmp_path_factory.mktemp("fuzz")
    url = database_url(request, request.param, tmp)
    mp = pytest.MonkeyPatch()
    gen = make_api(url, tmp, mp)
    api = next(gen)
    seed_study(api, tmp, zones=[("LUS R1", 2), ("LUS L1", 1)])
    yield api
    gen.close()
    mp.undo()


def test_api_fuzz(fuzz_api: Api) -> None:
    """Every operation, positive and negative inputs, with an admin key: no 5xx, responses match the spec.

    Driven through schemathesis' Python API (its pytest plugin does not run under pytest 9 yet).
    """
    token = fuzz_api.tokens["admin"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_api.client.app)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck), phases=[Phase.generate],
            )  # fmt: skip
            def run(case: Any) -> None:
                case.call_and_validate(headers={"X-API-Key": token}, excluded_checks=EXCLUDED)

            try:
                run()
            except Unsatisfiable:  # an operation without parameters has no invalid input to send
                assert mode == GenerationMode.NEGATIVE and not op.query and not op.path_parameters
            except (Exception, BaseExceptionGroup) as exc:  # collect all, report together
                failures.append(f"{op.label} [{mode.value}]: {str(exc)[:1500]}")
    assert operations >= 25
    assert not failures, "\n\n".join(failures)

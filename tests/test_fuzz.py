"""Schemathesis against the service's own OpenAPI document: every route, valid and invalid input.

The real app (real lifespan, bundle, Redis) is called through ASGI. For every operation
the document lists, Hypothesis generates requests that fit the schema (positive) and
requests that break it (negative); each answer must not be a 5xx and must match the
document: a documented status code, the documented content type, a body that validates
against the documented schema. Bounded (a fixed number of examples per operation,
derandomised) so it runs in seconds and the same way every time.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi

from service.app import create_app
from test_api import loaded_redis, settings_for, trained  # noqa: F401  (fixtures)

TOKEN = "fuzz-admin-token-1"
KEY = "fuzz-api-key-0001"
EXAMPLES = 30  # per operation and mode

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


@pytest.fixture
def api(trained, loaded_redis):
    app = create_app(settings_for(trained.bundle.path, loaded_redis, admin_token=TOKEN, api_keys=KEY))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        yield schema
    finally:
        asgi.shutdown_lifespans()  # the app's lifespan runs in schemathesis' event-loop thread


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzzing_finds_no_server_error_and_no_schema_violation(api, mode, capsys):
    operations = [result.ok() for result in api.get_all_operations()]
    labels = {op.label for op in operations}
    assert labels >= {"GET /healthz", "GET /metrics", "GET /readyz", "POST /admin/reload", "POST /rank"}
    seen: Counter = Counter()
    auth = {"Authorization": f"Bearer {TOKEN}", "X-API-Key": KEY}
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to break: the GET routes take no input

        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            response = case.call(headers=auth)
            seen[(op.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS)

        run()
    assert not [k for k in seen if k[1] >= 500]
    assert sum(seen.values()) >= len(operations) * 5
    if mode == GenerationMode.POSITIVE:
        assert seen[("POST /rank", 200)] > 0 and seen[("POST /admin/reload", 404)] + seen[("POST /admin/reload", 200)] > 0
    else:
        assert sum(n for (label, status), n in seen.items() if label == "POST /rank" and status == 422) > 0
    with capsys.disabled():
        print(f"\n[fuzz {mode}] {sum(seen.values())} requests: " + ", ".join(f"{k[0]} {k[1]}: {n}" for k, n in sorted(seen.items())))

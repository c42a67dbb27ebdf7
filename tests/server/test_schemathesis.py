"""Requests generated from /openapi.json (valid and invalid ones): never a 5xx, never a 422.

The strategies come from schemathesis; hypothesis drives them directly because
schemathesis' own pytest plugin does not support this pytest version.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_live(start_server):
    # A short context keeps the valid requests hypothesis generates (n up to 128) cheap.
    return start_server(max_model_len=24, max_num_seqs=64)


@pytest.fixture(scope="module")
def operations(fuzz_live):
    schema = schemathesis.openapi.from_url(f"{fuzz_live.base_url}/openapi.json")
    return {result.ok().label: result.ok() for result in schema.get_all_operations()}


def test_every_route_is_described(operations):
    assert set(operations) == {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
                               "GET /v1/models/{model}", "GET /health", "GET /ready"}


@pytest.mark.parametrize(
    ("label", "mode"),
    [
        ("POST /v1/chat/completions", GenerationMode.POSITIVE),
        ("POST /v1/chat/completions", GenerationMode.NEGATIVE),
        ("POST /v1/completions", GenerationMode.POSITIVE),
        ("POST /v1/completions", GenerationMode.NEGATIVE),
        ("GET /v1/models", GenerationMode.POSITIVE),  # no parameters: nothing to make invalid
        ("GET /v1/models/{model}", GenerationMode.POSITIVE),
    ],
)
def test_no_server_errors(operations, fuzz_live, label, mode):
    operation = operations[label]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=fuzz_live.base_url, timeout=30)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            assert response.status_code != 422
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()

"""The server keeps the contract its /openapi.json states: a bounded schemathesis run (a few
hundred generated requests, schema-valid and not, against a live server with an API key) finds
no server error and no response the schema does not allow (status code, content type, headers,
body), and every request the schema forbids is rejected."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from serve_factory import server_thread

KEY = "contract-key"
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance,
          checks.negative_data_rejection]
EXAMPLES = 20      # per operation and mode: 7 operations, 4 with invalid inputs: 220 cases


def test_the_server_keeps_its_openapi_contract(tmp_path):
    with server_thread(tmp_path, api_key=KEY, max_queued=64, train_batch_wait_s=0.05,
                       cfg_overrides={"workload.max_output_tokens": 8}) as (url, app):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        ran = 0
        for found in schema.get_all_operations():
            op = found.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
                          derandomize=True, suppress_health_check=list(HealthCheck), database=None)
                def one(case):
                    nonlocal ran
                    ran += 1
                    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS,
                                           timeout=60)
                try:
                    one()
                except Unsatisfiable:   # no invalid request exists (GET without parameters)
                    assert mode is GenerationMode.NEGATIVE
        assert ran >= 150, ran
        assert app.state.host.health()[0] == 200

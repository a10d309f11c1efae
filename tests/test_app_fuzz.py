"""Smoke test of benchmarks/api_fuzz.py: schemathesis over the labeling app's OpenAPI description, as an
API token, a labeler and an admin, with a few examples per operation; no request gets a server error.
Skipped when schemathesis is not installed (it is in the test extra)."""

from __future__ import annotations

import json

import pytest

from test_reward_benchmark import load_benchmark


def test_no_operation_answers_a_server_error(capsys):
    pytest.importorskip("schemathesis")
    bench = load_benchmark("api_fuzz")
    assert bench.main(["--examples", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["operations"] >= 15 and set(out["identities"]) == {"token", "labeler", "admin"}
    for who, seen in out["identities"].items():
        assert seen["requests"] >= out["operations"], (who, seen)
        codes = {int(c) for c in seen["statuses"]}
        assert any(200 <= c < 300 for c in codes), (who, seen)  # the credentials worked somewhere
    assert out["server_errors"] == 0, out["first_server_errors"]

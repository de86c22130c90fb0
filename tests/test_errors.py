"""The errors' OpenAI fields: what a runtime's error gets when it names none."""

from __future__ import annotations

from gateway.errors import UpstreamError


def test_a_runtimes_429_is_rate_limit_exceeded_unless_it_names_a_code() -> None:
    assert UpstreamError(429, "slow down").code == "rate_limit_exceeded"
    assert UpstreamError(429, "no credit", code="insufficient_quota").code == "insufficient_quota"
    assert UpstreamError(503, "busy").code is None
    body = UpstreamError(429, "slow down").body()["error"]
    assert body == {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}

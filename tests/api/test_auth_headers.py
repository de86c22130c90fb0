"""Two `Authorization` headers: every path reads the first, so a client gets one answer whether
its request reaches the raw ASGI handlers (the OpenAI POSTs) or Litestar's routes (/v1/models)."""

from __future__ import annotations

import httpx

from tests.conftest import StartGateway


def test_every_path_reads_the_first_authorization_header(start_gateway: StartGateway, fake_upstream: str) -> None:
    gateway = start_gateway({"backends": [{"name": "up", "runtime": "openai", "url": fake_upstream,
                                           "serves": ["fake"]}]})
    valid, wrong = f"Bearer {gateway.new_key()}", "Bearer sk-gw-wrong"
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for first, second, status in ((wrong, valid, 401), (valid, wrong, 200)):
            headers = [("authorization", first), ("authorization", second)]
            posted = client.post("/v1/chat/completions", headers=headers, json=chat)
            listed = client.get("/v1/models", headers=headers)
            assert (posted.status_code, listed.status_code) == (status, status), (posted.text, listed.text)

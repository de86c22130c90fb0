"""A whole answer that is not the OpenAI object asked for is a 502, for every runtime that answers
OpenAI objects: a backend `url` that points at some other service answers its own JSON with a 200,
and that must not reach the client as a success with no choices and no usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from adapters import for_runtime
from gateway.errors import UpstreamError
from tests.conftest import StartGateway
from tests.helpers import error_of, serving

OPENAI_RUNTIMES = ["openai", "vllm", "llamacpp"]  # Ollama answers in its own API: its own test below

NOT_A_COMPLETION = [{"status": "ok"}, {"object": "chat.completion", "choices": None}, {"choices": {"0": {}}},
                    {"data": [{"embedding": [0.1]}]}]
NOT_EMBEDDINGS = [{"status": "ok"}, {"object": "list", "data": None}, {"choices": []}]


@pytest.mark.parametrize("runtime", OPENAI_RUNTIMES)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("answer", NOT_A_COMPLETION, ids=json.dumps)
def test_a_completion_without_a_choices_list_is_a_502(runtime: str, endpoint: str, answer: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError) as caught:
        for_runtime(runtime).response(endpoint, json.dumps(answer).encode())
    assert caught.value.status == 502 and caught.value.type == "server_error"
    assert "not an OpenAI" in caught.value.message and "`choices`" in caught.value.message


@pytest.mark.parametrize(("endpoint", "needs"), [("chat", "message"), ("completions", "response"),
                                                ("embeddings", "embeddings")])
def test_an_ollama_answer_without_its_content_is_a_502(endpoint: str, needs: str) -> None:
    # Ollama answers its own API, so its own field is what tells an answer from another service's JSON.
    with pytest.raises(UpstreamError) as caught:
        for_runtime("ollama").response(endpoint, b'{"status": "ok"}', {})
    assert caught.value.status == 502 and f"no `{needs}`" in caught.value.message


@pytest.mark.parametrize("runtime", OPENAI_RUNTIMES)
@pytest.mark.parametrize("answer", NOT_EMBEDDINGS, ids=json.dumps)
def test_embeddings_without_a_data_list_are_a_502(runtime: str, answer: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError) as caught:
        for_runtime(runtime).response("embeddings", json.dumps(answer).encode())
    assert caught.value.status == 502 and "not an OpenAI" in caught.value.message and "`data`" in caught.value.message


@pytest.mark.parametrize(("endpoint", "answer"), [
    ("chat", {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "extra": 1,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}),
    ("completions", {"object": "text_completion", "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}),
    ("embeddings", {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]}),
])
def test_the_passthrough_hands_on_an_openai_answer_as_it_came(endpoint: str, answer: dict[str, Any]) -> None:
    assert for_runtime("openai").response(endpoint, json.dumps(answer).encode()) == answer


class _SomeOtherService(BaseHTTPRequestHandler):
    """What a backend `url` with the wrong port may reach: a service that is up, answering its own JSON."""

    def do_GET(self) -> None:
        self._ok()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self._ok()

    def _ok(self) -> None:
        payload = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_service_url() -> Iterator[str]:
    with serving(_SomeOtherService) as url:
        yield url


def test_a_client_gets_a_502_not_an_empty_completion_from_a_backend_that_is_not_openai(
        start_gateway: StartGateway, other_service_url: str) -> None:
    gateway = start_gateway({"backends": [{"name": "wrong-port", "runtime": "openai", "url": other_service_url,
                                           "serves": ["m1"]}]})
    with gateway.http(gateway.new_key()) as client:
        chat = client.post("/v1/chat/completions", json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
        error = error_of(chat, 502)
        assert set(chat.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_error" and "not an OpenAI chat.completion object" in error["message"]
        embeddings = client.post("/v1/embeddings", json={"model": "m1", "input": "hi"})
        assert "not an OpenAI embeddings list object" in error_of(embeddings, 502)["message"]

"""What a client can do to a request's accounting through the OpenAI endpoints: whatever it sends
or leaves, and whatever the runtime reports, the slot comes back, the limiter's reservation is
honest and the key's usage stays countable (gateway/api/v1.py, gateway/openai.py)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from tests.conftest import StartGateway
from tests.helpers import GatewayProcess, serving

CHAT = [{"role": "user", "content": "hi"}]
GARBAGE_USAGE = {"prompt_tokens": "ten", "completion_tokens": [1], "total_tokens": None}
HUGE_USAGE = {"prompt_tokens": 2**70, "completion_tokens": 1e300, "total_tokens": 2**71}


class _Runtime(BaseHTTPRequestHandler):
    """An OpenAI-speaking runtime whose model name says how it answers."""

    protocol_version = "HTTP/1.1"
    left: list[str] = []  # models whose client connection closed before the answer was written

    def do_GET(self) -> None:  # the health probe
        self._json({"status": "ok"})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        model = request["model"]
        if model == "slow":
            time.sleep(3)
        usage = {"garbage": GARBAGE_USAGE, "huge": HUGE_USAGE}.get(model, {"prompt_tokens": 3, "completion_tokens": 2,
                                                                             "total_tokens": 5})
        if request.get("stream"):
            self._stream(model, 400 if model == "long" else 40)
            return
        if self.path.endswith("/embeddings"):
            self._json({"object": "list", "model": model, "data": [{"object": "embedding", "index": 0,
                                                                   "embedding": [0.1]}],
                        "usage": {"prompt_tokens": 1, "total_tokens": 1}})
            return
        self._json({"id": "c1", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}], "usage": usage})

    def _stream(self, model: str, chunks: int) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        try:
            for i in range(chunks):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                         "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:
            _Runtime.left.append(model)

    def _json(self, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:
            _Runtime.left.append(json.loads(payload).get("model", "?"))

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def runtime_serving() -> Iterator[str]:
    """_Runtime on a free port, in a thread of its own; its URL, until the block ends."""
    with serving(_Runtime) as url:
        yield url


@pytest.fixture
def gateway(start_gateway: StartGateway) -> Iterator[GatewayProcess]:
    with runtime_serving() as url:
        # One slot: a request that kept its slot would hold up the next one.
        yield start_gateway({
            "backends": [{"name": "one-slot", "runtime": "openai", "url": url,
                          "serves": ["fast", "slow", "garbage", "huge", "streaming"], "slots": 1}],
            "queue": {"max_wait": "1s"}, "limits": {"default_completion_tokens": 500}})


def _usage_of(gateway: GatewayProcess, key_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10  # usage is flushed to the store about once a second
    while True:
        rows = gateway.admin("GET", "/admin/usage", params={"group_by": "key"}).json()["data"]
        row = next((u for u in rows if u["key"] == key_id), None)
        if row is not None or time.monotonic() > deadline:
            return row or {}
        time.sleep(0.2)


def test_usage_a_runtime_reports_wrongly_keeps_no_slot_and_breaks_no_count(gateway: GatewayProcess) -> None:
    created = gateway.admin("POST", "/admin/keys", json={"name": "counts", "tpm": 100_000}).json()
    with gateway.http(created["key"]) as client:
        for model in ("garbage", "huge", "garbage", "huge", "fast"):
            r = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT})
            assert r.status_code == 200, (model, r.text)
    time.sleep(1.5)  # a usage flush that failed would have stopped every later one
    with gateway.http(created["key"]) as client:
        assert client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT}).status_code == 200
    deadline = time.monotonic() + 10
    while (usage := _usage_of(gateway, created["id"])).get("requests") != 6:
        assert time.monotonic() < deadline, usage
        time.sleep(0.2)
    # What could not be a count is counted as nothing; the two good answers count exactly.
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (6, 4)
    assert "usage flush failed" not in gateway.log()


def test_a_client_that_leaves_before_the_answer_frees_its_slot_at_once(gateway: GatewayProcess) -> None:
    key = gateway.new_key()
    with gateway.http(key) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json={"model": "slow", "messages": CHAT}, timeout=0.5)
        started = time.monotonic()
        # The slow answer takes 3 s; the queue waits 1 s at most: only a freed slot lets this in.
        r = client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + 5
    while "slow" not in _Runtime.left:  # the runtime saw the request closed: it stops generating
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("lines", [1, 10])  # gone before the gateway's watch starts (100 ms), and after
def test_leaving_a_stream_before_its_usage_does_not_make_it_free(gateway: GatewayProcess, lines: int) -> None:
    _Runtime.left.clear()
    created = gateway.admin("POST", "/admin/keys", json={"name": "leaver", "tpm": 10_000}).json()
    with gateway.http(created["key"]) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "streaming", "messages": CHAT, "stream": True, "max_tokens": 2000}) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines(), 1):
                if n >= lines:
                    break  # and the connection closes: the client left, no usage chunk came
        deadline = time.monotonic() + 5
        while "streaming" not in _Runtime.left:  # the gateway closed the runtime's stream: generation stops
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the gateway releases the slot and settles
        r = client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT, "max_tokens": 10})
        assert r.status_code == 200, r.text
    # The stream's reservation (2,000 tokens and its prompt) stands: a refund would leave ~9,990.
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 10_000 - 2_000
    usage = _usage_of(gateway, created["id"])
    assert usage["completion_tokens"] >= 3  # the chunks it got, about a token each, plus the answer's 2


def test_the_reservation_counts_only_fields_checked_for_the_endpoint(gateway: GatewayProcess) -> None:
    key = gateway.admin("POST", "/admin/keys", json={"name": "budget", "tpm": 2_000}).json()["key"]
    with gateway.http(key) as client:
        # /v1/completions has no max_completion_tokens: the runtime gets it, the estimate ignores it.
        r = client.post("/v1/completions", json={"model": "fast", "prompt": "hi",
                                                 "max_completion_tokens": -1_000_000_000})
        assert r.status_code == 200, r.text
        assert 0 <= int(r.headers["x-ratelimit-remaining-tokens"]) <= 2_000 - 500
        # A chat body with an `input` field is still a chat: its budget is reserved.
        r = client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT, "input": "x"})
        assert r.status_code == 200, r.text
        assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 2_000 - 500  # (the first settled at 5)
        # Embeddings generate nothing, whatever `n` says.
        r = client.post("/v1/embeddings", json={"model": "fast", "input": "hi", "n": "abc"})
        assert r.status_code == 200, r.text


def test_a_list_of_prompts_reserves_an_answer_for_each(gateway: GatewayProcess) -> None:
    key = gateway.admin("POST", "/admin/keys", json={"name": "prompts", "tpm": 2_000}).json()["key"]
    with gateway.http(key) as client:
        # Eight prompts of 300 tokens each is 2,400 tokens, not 300: refused before it runs.
        r = client.post("/v1/completions", json={"model": "fast", "prompt": ["a"] * 8, "max_tokens": 300})
        assert r.status_code == 429 and "needs about 24" in r.json()["error"]["message"], r.text
        # A list of token ids is one prompt, as is a list holding one prompt.
        for one in ([1, 2, 3], [[1, 2, 3]], ["a"]):
            r = client.post("/v1/completions", json={"model": "fast", "prompt": one, "max_tokens": 300})
            assert r.status_code == 200, (one, r.text)


def test_llama_cpps_own_length_field_counts_in_the_reservation(start_gateway: StartGateway) -> None:
    # The audit's case: a tpm 300 key sent max_tokens 1 with n_predict 1000, which llama-server
    # obeys, and generated 1,000 tokens on a 1-token reservation.
    with runtime_serving() as url:
        gateway = start_gateway({"backends": [{"name": "llama", "runtime": "llamacpp", "serves": ["fast"],
                                               "url": url}]})
        key = gateway.admin("POST", "/admin/keys", json={"name": "small", "tpm": 300}).json()["key"]
        with gateway.http(key) as client:
            body = {"model": "fast", "messages": CHAT, "max_tokens": 1}
            r = client.post("/v1/chat/completions", json={**body, "n_predict": 1000})
            assert r.status_code == 429 and "needs about 10" in r.json()["error"]["message"], r.text
            for allowed in (body, {**body, "n_predict": 50}, {**body, "n_predict": -1}, {**body, "n_predict": "x"}):
                r = client.post("/v1/chat/completions", json=allowed)
                assert r.status_code == 200, (allowed, r.text)


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_completion_tokens": "7.0"}, "max_completion_tokens"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"stream": "false"}, "stream"),
    ({"temperature": "0.5"}, "temperature"),
])
def test_a_wrong_type_is_a_400_naming_the_field_not_a_conversion(gateway: GatewayProcess, body: dict[str, Any],
                                                                  param: str) -> None:
    with gateway.http(gateway.new_key()) as client:
        r = client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_body_nested_too_deeply_is_a_400(gateway: GatewayProcess) -> None:
    nested = '{"model": "fast", "messages": [{"role": "user", "content": "hi"}], "x": ' + "[" * 3000 + "]" * 3000 + "}"
    with gateway.http(gateway.new_key()) as client:
        r = client.post("/v1/chat/completions", content=nested, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["error"]["message"]


def test_a_key_revoked_while_its_request_runs_leaves_no_per_key_series(start_gateway: StartGateway) -> None:
    # metrics.key_labels: revoking a key drops its series (gateway.metrics.forget_key); a request
    # already under way when it was revoked finishes after that, and must not bring them back.
    with runtime_serving() as url:
        gateway = start_gateway({
            "backends": [{"name": "one", "runtime": "openai", "url": url, "serves": ["slow", "fast"]}],
            "metrics": {"key_labels": True}})
        created = gateway.admin("POST", "/admin/keys", json={"name": "revoked mid-request"}).json()
        with gateway.http(created["key"]) as client:
            assert client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT}).status_code == 200
            assert f'key_id="{created["id"]}"' in httpx.get(gateway.url + "/metrics").text
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(client.post, "/v1/chat/completions", json={"model": "slow", "messages": CHAT},
                                   timeout=30)
                time.sleep(1.0)  # on its way: the runtime answers "slow" after 3 s
                assert gateway.admin("DELETE", f"/admin/keys/{created['id']}").status_code == 200
                assert f'key_id="{created["id"]}"' not in httpx.get(gateway.url + "/metrics").text
                assert slow.result().status_code == 200  # admitted before the revocation: it is answered
        assert f'key_id="{created["id"]}"' not in httpx.get(gateway.url + "/metrics").text
